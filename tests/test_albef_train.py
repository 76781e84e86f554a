"""The real tiny ALBEF-ELIP under DeepSpeed: two ranks with ZeRO-3 partitioning every parameter,
then its checkpoint reloaded by ``python -m pipeline.eval retrieval``."""
import json
import math
import subprocess
import sys

import pytest

from data_prep import synthetic
from tests.helpers_train import repo_root, subprocess_env
from tests.test_train import _free_port, metrics


@pytest.mark.slow
def test_tiny_albef_zero3_two_ranks_then_eval_reloads_the_checkpoint(tmp_path):
    synthetic.build(tmp_path / "train", num=64, image_size=64, shard_size=16, min_shards=1)
    synthetic.build(tmp_path / "eval", num=8, image_size=64, shard_size=8, split="test", captions_per_image=2,
                    min_shards=1)
    ds = json.loads((repo_root() / "ds_configs" / "zero3.json").read_text())
    # partition every parameter (the tiny model's would all stay below the default threshold),
    # so position embeddings, [CLS] and the momentum copies really live as shards
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3_all.json").write_text(json.dumps(ds))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "pipeline.train", "--config", "tiny_albef_elip", f"train.run_dir={run}",
           f"train.deepspeed={tmp_path / 'zero3_all.json'}", "train.precision=fp32", "train.log_every=1",
           "train.image_grid_every=2", f"data.train_shards={tmp_path / 'train'}", "data.batch_size=4",
           "data.workers=0", "optim.max_steps=4", "optim.warmup_steps=1", "eval.every=4",
           f"eval.shards={tmp_path / 'eval'}", "eval.k_test=4", "eval.batch_size=4"]
    r = subprocess.run(cmd, cwd=repo_root(), env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    m = [row for row in metrics(run) if "train/loss" in row]  # eval rows are logged there too
    assert [x["step"] for x in m] == [1, 2, 3, 4]
    assert all(math.isfinite(x["train/loss"]) for x in m)
    # ELIP's plan for the tiny ViT: 64 patches -> 48 -> 25 kept (+ [CLS] + fused token)
    assert [m[-1][f"tokens/layer_{i:02d}"] for i in range(4)] == [65, 50, 50, 27]
    history = [json.loads(line) for line in (run / "eval_history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 4 and history[-1]["num_images"] == 8

    r = subprocess.run([sys.executable, "-m", "pipeline.eval", "retrieval", "--run", str(run), "--shards",
                        str(tmp_path / "eval"), "--k-test", "4", "--batch-size", "4"],
                       cwd=repo_root(), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads((run / "eval.json").read_text())
    assert {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "num_images"} <= set(result)
    assert result["num_images"] == 8 and result["step"] == 4
    assert "chance" in r.stdout
    # the CLI scores the same weights the in-training evaluation saw at step 4
    for key in ("itc_txt_r1", "itc_img_r1"):
        assert result[key] == pytest.approx(history[-1][key])
