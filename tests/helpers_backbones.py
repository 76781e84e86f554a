"""Shared by the backbone tests: the synthetic set in memory, a short in-process training, and a
two-rank DeepSpeed pre-training followed by ``python -m pipeline.eval retrieval``."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from data_prep import synthetic
from pipeline.data.transforms import eval_transform
from tests.helpers_train import repo_root, subprocess_env


def synthetic_batch(n: int = 8, image_size: int = 64, seed: int = 0) -> dict:
    """``n`` synthetic shapes samples as a training batch (``image [n, 3, S, S]``, ``text``)."""
    transform = eval_transform(image_size)
    images, texts = [], []
    for i in range(n):
        image, captions, _ = synthetic.make_example(seed, i, image_size=96)
        images.append(transform(image))
        texts.append(captions[0])
    return {"image": torch.stack(images), "text": texts, "epoch_progress": 1.0}


def train_steps(model: torch.nn.Module, batch: dict, steps: int, lr: float = 1e-3) -> list[dict]:
    """``steps`` AdamW steps on one batch; each step's losses as floats."""
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    history = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        out = model(batch)
        out["loss"].backward()
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in out.items() if k == "loss" or k.startswith("loss_")})
    return history


def zero3_all_params(tmp_path) -> str:
    """ds_configs/zero3.json partitioning every parameter (the tiny models' would all stay
    below the default persistence threshold), so the ZeRO-3 paths are really exercised."""
    ds = json.loads((repo_root() / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3_all.json"
    path.write_text(json.dumps(ds))
    return str(path)


def build_synthetic_shards(tmp_path) -> tuple[str, str]:
    """64 training samples and an 8-image evaluation set with 2 captions each, 64 px."""
    synthetic.build(tmp_path / "train", num=64, image_size=64, shard_size=16, min_shards=1)
    synthetic.build(tmp_path / "eval", num=8, image_size=64, shard_size=8, split="test", captions_per_image=2,
                    min_shards=1)
    return str(tmp_path / "train"), str(tmp_path / "eval")


def two_rank_pretraining(tmp_path, config: str, *, port: int, deepspeed: str, steps: int = 4,
                         extra: tuple[str, ...] = ()) -> tuple[list[dict], dict]:
    """Pre-train ``config`` on 2 CPU ranks for ``steps`` steps (retrieval evaluated at the end),
    then evaluate the checkpoint with the CLI. Returns ``(logged train rows, eval.json)``."""
    from tests.test_train import metrics

    train, eval_ = build_synthetic_shards(tmp_path)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "pipeline.train", "--config", config, f"train.run_dir={run}", f"train.deepspeed={deepspeed}",
           "train.precision=fp32", "train.log_every=1", "train.image_grid_every=2", f"data.train_shards={train}",
           "data.batch_size=4", "data.workers=0", f"optim.max_steps={steps}", "optim.warmup_steps=1",
           f"eval.every={steps}", f"eval.shards={eval_}", "eval.k_test=4", "eval.batch_size=4", *extra]
    r = subprocess.run(cmd, cwd=repo_root(), env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    rows = [row for row in metrics(run) if "train/loss" in row]  # eval rows are logged there too
    assert [x["step"] for x in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(x["train/loss"]) for x in rows)
    history = [json.loads(line) for line in (run / "eval_history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == steps and history[-1]["num_images"] == 8

    r = subprocess.run([sys.executable, "-m", "pipeline.eval", "retrieval", "--run", str(run), "--shards", eval_,
                        "--k-test", "4", "--batch-size", "4"],
                       cwd=repo_root(), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "chance" in r.stdout
    result = json.loads((run / "eval.json").read_text())
    assert {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"} <= set(result)
    assert result["num_images"] == 8 and result["step"] == steps
    # the CLI scores the same weights the in-training evaluation saw at the last step (ITC
    # similarities where the model has them; METER's ITM scores every pair the same way)
    keys = [k for k in ("itc_txt_r1", "itc_img_r1") if k in result] or ["txt_r1", "img_r1", "txt_r5", "img_r5"]
    for key in keys:
        assert result[key] == pytest.approx(history[-1][key])
    return rows, result
