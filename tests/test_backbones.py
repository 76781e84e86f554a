"""BLIP and METER end to end: losses that fall on the tiny synthetic set, retrieval evaluation,
and a two-rank DeepSpeed pre-training whose checkpoint ``python -m pipeline.eval retrieval`` reloads."""
import copy
import json
import math
import subprocess
import sys

import pytest
import torch

from pipeline.config import load_config
from pipeline.eval.retrieval import evaluate_shards
from pipeline.models import build_model
from tests.helpers_backbones import build_synthetic_shards, synthetic_batch, train_steps, zero3_all_params
from tests.helpers_train import repo_root, subprocess_env
from tests.test_train import _free_port

# the loss each backbone learns fastest from a fixed batch (ITC/ITM depend on queues and negatives)
CAPTION_LOSS = {"tiny_blip_elip": "loss_lm", "tiny_meter_elip": "loss_mlm"}


@pytest.mark.parametrize("config", sorted(CAPTION_LOSS))
def test_losses_are_finite_and_fall_on_the_synthetic_set(config):
    torch.manual_seed(0)
    model = build_model(load_config(config).model)
    history = train_steps(model, synthetic_batch(8), steps=12, lr=2e-3)
    assert all(math.isfinite(v) for step in history for v in step.values())
    first, last = history[:3], history[-3:]
    for key in ("loss", CAPTION_LOSS[config]):
        before, after = sum(h[key] for h in first) / 3, sum(h[key] for h in last) / 3
        assert after < 0.9 * before, (key, before, after)


@pytest.mark.parametrize("config", sorted(CAPTION_LOSS))
def test_grad_checkpointing_gives_the_same_step(config):
    torch.manual_seed(0)
    original = build_model(load_config(config).model).train()
    batch = synthetic_batch(4)
    grads = []
    for enable in (False, True):
        model = copy.deepcopy(original)  # a step changes the queues and the teacher
        model.set_grad_checkpointing(enable)
        torch.manual_seed(1)  # same masks, negatives and dropout
        out = model(batch)
        out["loss"].backward()
        grads.append((out["loss"].item(), model.visual_encoder.patch_embed.proj.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("config", sorted(CAPTION_LOSS))
def test_retrieval_evaluation_runs(config, tmp_path):
    _, eval_shards = build_synthetic_shards(tmp_path)
    torch.manual_seed(0)
    model = build_model(load_config(config).model).eval()
    m = evaluate_shards(model, eval_shards, image_size=64, batch_size=4, k_test=4)
    assert m["num_images"] == 8 and m["num_texts"] == 16
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"):
        assert 0.0 <= m[key] <= 100.0
    assert ("itc_txt_r1" in m) == (config == "tiny_blip_elip")  # METER has no ITC


@pytest.mark.slow
@pytest.mark.parametrize("config,tokens", [("tiny_blip_elip", [65, 50, 50, 27]), ("tiny_meter_elip", [65, 59, 46, 30])])
def test_two_rank_zero3_pretraining_then_eval_reloads_the_checkpoint(config, tokens, tmp_path):
    from tests.helpers_backbones import two_rank_pretraining

    rows, result = two_rank_pretraining(tmp_path, config, port=_free_port(), deepspeed=zero3_all_params(tmp_path))
    assert [rows[-1][f"tokens/layer_{i:02d}"] for i in range(4)] == tokens
    parts = {"tiny_blip_elip": ("itc", "itm", "lm"), "tiny_meter_elip": ("itm", "mlm")}[config]
    assert all(math.isfinite(rows[-1][f"train/loss_{p}"]) for p in parts)
    if config == "tiny_blip_elip":  # BLIP also captions: the caption CLI scores the same checkpoint
        out = tmp_path / "caption.json"
        r = subprocess.run([sys.executable, "-m", "pipeline.eval", "caption", "--run", str(tmp_path / "run"),
                            "--shards", str(tmp_path / "eval"), "--batch-size", "4", "--max-new-tokens", "6",
                            "--num-beams", "2", "--out", str(out)],
                           cwd=repo_root(), env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-4000:]
        scores = json.loads(out.read_text())
        assert {"bleu_4", "cider"} <= set(scores) and scores["step"] == 4
        assert scores["generate"]["prompt"] == "a picture of " and scores["examples"]
        assert all(isinstance(e["caption"], str) and e["references"] for e in scores["examples"])
