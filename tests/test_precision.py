"""Mixed precision: the accelerator check, bf16 training of the real tiny ALBEF, fp16 where the
hardware has it (refused with a clear message where it has not), and the fp32 EMA shadow that
keeps ALBEF's momentum encoders moving in half precision."""
import subprocess
import sys

import pytest
import torch

from data_prep import synthetic
from pipeline.config import ConfigError, load_config
from pipeline.models import build_model
from pipeline.train.optim import check_precision
from tests.helpers_train import repo_root, subprocess_env
from tests.test_train import metrics


class _Accelerator:
    def __init__(self, fp16: bool, bf16: bool):
        self.fp16, self.bf16 = fp16, bf16

    def device_name(self):
        return "fake"

    def is_fp16_supported(self):
        return self.fp16

    def is_bf16_supported(self):
        return self.bf16


def test_precision_the_accelerator_lacks_is_refused_naming_the_key():
    check_precision("fp32", _Accelerator(False, False))
    check_precision("fp16", _Accelerator(True, False))
    check_precision("bf16", _Accelerator(False, True))
    with pytest.raises(ConfigError, match=r"^train\.precision=fp16: .*no fp16 support; use bf16 or fp32"):
        check_precision("fp16", _Accelerator(False, True))
    with pytest.raises(ConfigError, match=r"^train\.precision=bf16: .*use fp16 or fp32"):
        check_precision("bf16", _Accelerator(True, False))


def test_momentum_encoders_follow_the_online_weights_in_bf16():
    cfg = load_config("tiny_albef_elip", ["model.momentum=0.99"]).model
    torch.manual_seed(0)
    model = build_model(cfg).to(torch.bfloat16)
    online, teacher = model.visual_encoder.patch_embed.proj.weight, model.visual_encoder_m.patch_embed.proj.weight
    start = teacher.detach().float().clone()
    with torch.no_grad():  # online weights 1% of the weight scale away from the teacher
        online.add_(0.01 * online.float().abs().mean() * torch.randn_like(online.float()).sign().to(online.dtype))
    naive = teacher.detach().clone()
    for _ in range(100):
        model._momentum_update()
        naive.mul_(0.99).add_(online.detach(), alpha=0.01)  # the same EMA done in bf16 itself
    exact = start + (1 - 0.99**100) * (online.detach().float() - start)
    # the teacher is the fp32 EMA rounded once to bf16 ...
    torch.testing.assert_close(teacher.float(), exact, rtol=2**-8, atol=1e-6)
    # ... while the EMA done in bf16 loses most of the update to rounding
    assert (naive.float() - start).norm() < 0.3 * (exact - start).norm()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_tiny_albef_trains_in_half_precision_or_is_refused(tmp_path, precision):
    from deepspeed.accelerator import get_accelerator

    synthetic.build(tmp_path / "train", num=32, image_size=64, shard_size=16, min_shards=1)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.train", "--config", "tiny_albef_elip", f"train.run_dir={run}",
           f"train.precision={precision}", "train.log_every=1", f"data.train_shards={tmp_path / 'train'}",
           "data.batch_size=4", "data.workers=0", "optim.max_steps=3", "optim.warmup_steps=1"]
    r = subprocess.run(cmd, cwd=repo_root(), env=subprocess_env(), capture_output=True, text=True, timeout=600)
    acc = get_accelerator()
    supported = acc.is_fp16_supported() if precision == "fp16" else acc.is_bf16_supported()
    if not supported:  # this machine: fp16 on a CPU without fp16 kernels
        assert r.returncode == 2 and f"config error: train.precision={precision}" in r.stderr, r.stderr[-3000:]
        assert not (run / "checkpoints").exists()
        return
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    rows = [row for row in metrics(run) if "train/loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(row["train/loss"])) for row in rows)
    if precision == "fp16":
        assert all("train/loss_scale" in row for row in rows)
