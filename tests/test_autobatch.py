"""Automatic micro-batch: the search (line fit, verification, out-of-memory), the memory model,
the batch / learning-rate rules, the trainer integration, and the benchmark's ELIP+ target."""
import json
import math
import subprocess
import sys

import pytest
import torch

from data_prep import synthetic
from pipeline.train import autobatch as ab
from pipeline.config import ConfigError, load_config
from tests.helpers_train import repo_root, subprocess_env


def _counting(fn):
    calls = []

    def measure(b):
        calls.append(b)
        return fn(b)

    return measure, calls


def test_linear_memory_is_solved_with_one_verifying_probe():
    measure, calls = _counting(lambda b: 1000 + 300 * b)
    result = ab.find_micro_batch(measure, budget_bytes=50_000, state_bytes=20_000, start=8)
    assert result.micro_batch == math.floor((30_000 - 1000) / 300) == 96
    assert calls == [8, 4, 96]  # two fit the line, one confirms
    assert result.bytes_per_sample == pytest.approx(300) and result.fixed_bytes == pytest.approx(1000)


def test_superlinear_memory_and_out_of_memory_are_walked_back_within_budget():
    room = 100_000

    def measure(b):  # grows faster than the line through 4 and 8, and the device dies above 60
        return None if b > 60 else 500 * b + 20 * b * b

    fits = [b for b in range(1, 200) if measure(b) is not None and measure(b) <= room]
    result = ab.find_micro_batch(measure, budget_bytes=room + 5_000, state_bytes=5_000, start=8, max_probes=8)
    assert result.micro_batch <= max(fits) and measure(result.micro_batch) <= room
    assert result.micro_batch >= max(fits) - 3  # close to the true answer, not a timid guess
    oom, calls = _counting(lambda b: None if b > 16 else 100 * b)
    result = ab.find_micro_batch(oom, budget_bytes=10**9, state_bytes=0, start=64, max_probes=8)
    assert calls[:3] == [64, 32, 16] and result.micro_batch == 16  # halving past OOM, then the largest that ran


def test_nothing_fits_and_bad_budgets_are_clear_errors():
    with pytest.raises(ValueError, match="model states alone"):
        ab.find_micro_batch(lambda b: 1, budget_bytes=10, state_bytes=20, start=4)
    with pytest.raises(ValueError, match="nothing fits"):
        ab.find_micro_batch(lambda b: None, budget_bytes=10**6, state_bytes=0, start=4)
    with pytest.raises(ValueError, match="no batch fits"):
        ab.find_micro_batch(lambda b: 10**6 * b, budget_bytes=10**6, state_bytes=0, start=4)
    with pytest.raises(ConfigError, match=r"^autobatch\.budget: .*'lots'"):
        ab.parse_budget(load_config("tiny_albef_elip", ["autobatch.budget=lots"]).autobatch)
    assert ab.parse_budget(load_config("tiny_albef_elip", ["autobatch.budget=70"]).autobatch) == 70.0
    assert ab.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not ab.is_out_of_memory(ValueError("shapes do not match"))


def test_model_states_follow_zero_sharding():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10))  # 2 x 110 parameters
    model[1].requires_grad_(False)
    assert ab.model_state_bytes(model, "fp32", 0, 8) == 110 * 16 + 110 * 4
    assert ab.model_state_bytes(model, "bf16", 1, 4) == 110 * (2 + 2 + 12 / 4) + 110 * 2
    assert ab.model_state_bytes(model, "bf16", 2, 4) == 110 * (2 + 14 / 4) + 110 * 2
    assert ab.model_state_bytes(model, "bf16", 3, 4) == 110 * 16 / 4 + 110 * 2 / 4


def test_rules_apply_the_batch_and_state_what_changed():
    cfg = load_config("tiny_albef_elip", ["data.batch_size=32", "train.grad_accum=2", "optim.lr=1e-4"])
    scaled, note = ab.apply_rule(cfg, 48)
    assert (scaled.data.batch_size, scaled.train.grad_accum) == (48, 2) and scaled.optim.lr == pytest.approx(1.5e-4)
    assert "linear scaling" in note and cfg.data.batch_size == 32  # the input config is untouched
    cfg.autobatch.rule = "keep_lr"
    kept, _ = ab.apply_rule(cfg, 48)
    assert kept.data.batch_size == 48 and kept.optim.lr == 1e-4
    cfg.autobatch.rule = "keep_global"
    same, note = ab.apply_rule(cfg, 48)  # 64 samples per rank and step: 32 x 2 fits in 48 -> largest divisor 32
    assert (same.data.batch_size, same.train.grad_accum) == (32, 2)
    small, _ = ab.apply_rule(cfg, 20)  # memory for only 20: 16 x 4
    assert (small.data.batch_size, small.train.grad_accum) == (16, 4) and "global batch kept" in note


@pytest.mark.slow
def test_trainer_searches_before_training_and_a_resume_reuses_the_answer(tmp_path):
    synthetic.build(tmp_path / "train", num=64, image_size=64, shard_size=32, min_shards=1)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.train", "--config", "tiny_albef_elip", f"train.run_dir={run}",
           f"data.train_shards={tmp_path / 'train'}", "data.batch_size=4", "data.workers=0",
           "autobatch.budget=baseline", "autobatch.rule=keep_lr", "optim.warmup_steps=1", "train.log_every=1"]
    r = subprocess.run(cmd + ["optim.max_steps=4", "train.stop_at_step=1"], cwd=repo_root(), env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-5000:]
    found = json.loads((run / "autobatch.json").read_text())
    micro = found["result"]["micro_batch"]
    assert micro >= 4  # ELIP's pruned model fits at least the unpruned batch in the unpruned budget
    assert f"micro-batch {micro}" in r.stderr and "budget" in r.stderr
    assert load_config(run / "config.yaml").data.batch_size == micro
    r = subprocess.run(cmd + ["optim.max_steps=4"], cwd=repo_root(), env=subprocess_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-5000:]
    assert "autobatch: reusing" in r.stderr and "autobatch probe" not in r.stderr
    assert "resumed from" in r.stderr


@pytest.mark.slow
def test_bench_autobatch_elip_admits_the_paper_batch_gain():
    r = subprocess.run([sys.executable, "-m", "pipeline.bench", "autobatch", "--quick", "--methods", "elip-reuse",
                        "--json"], cwd=repo_root(), env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = {row["method"]: row for row in json.loads(r.stdout.strip().splitlines()[-1])["rows"]}
    assert set(rows) == {"none", "elip-reuse"} and rows["none"]["micro_batch"] == 40
    assert rows["elip-reuse"]["micro_batch"] >= 1.35 * 40, rows
    assert rows["elip-reuse"]["bytes_per_sample"] < 0.8 * rows["none"]["bytes_per_sample"]
