"""python -m pipeline.compare run on a tiny sweep (tiny ALBEF, 2 steps, one CPU rank): an
interrupted variant resumes from its checkpoint, a failing variant is reported while the others
run, finished runs are skipped on the next call, and the report reads what was written. The
resumed variant is ELIP with the adaptive per-image budget, so the same runs show its padded
batches train, log the budgets' mean and spread, and evaluate (retrieval in batches of 4 images,
each batch padded to its own largest budget).
One sweep directory is shared by the module (each training is a DeepSpeed subprocess)."""
import json
import os

import pytest

from data_prep import synthetic
from pipeline.compare.__main__ import main
from tests.helpers_train import repo_root

pytestmark = pytest.mark.slow

SWEEP = """
base: tiny_albef_elip
overrides: [optim.max_steps=2, optim.warmup_steps=1, data.batch_size=8, data.workers=0, data.shuffle_buffer=16,
            train.checkpoint_every=1, train.log_every=1, train.image_grid_every=0, eval.k_test=4, eval.batch_size=4,
            data.train_shards={train}, eval.shards={eval}]
seeds: [0]
ranks: 1
baseline: none
variants:
  none: [model.vision.reduction.method=none]
  adaptive: [model.vision.reduction.budget_tau=0.3]
  broken: [data.train_shards={train}/nonexistent]
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    synthetic.build(root / "train", num=48, image_size=64, shard_size=24, min_shards=1)
    synthetic.build(root / "eval", num=12, image_size=64, shard_size=12, min_shards=1, captions_per_image=5,
                    split="test")
    path = root / "sweep.yaml"
    path.write_text(SWEEP.format(train=root / "train", eval=root / "eval"))
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(repo_root()) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("TORCH_EXTENSIONS_DIR", str(root / "torch_extensions"))
        calls = [main(["run", str(path), "--out", str(out), "--only", "adaptive", "train.stop_at_step=1"]),
                 main(["run", str(path), "--out", str(out)])]
        logs = {name: (out / name / "seed0" / "sweep.log").read_text() for name in ("none", "adaptive")}
        calls.append(main(["run", str(path), "--out", str(out), "--only", "none,adaptive", "--report"]))
    return out, calls, logs


def _record(out, name):
    return json.loads((out / name / "seed0" / "sweep_run.json").read_text())


def test_interrupted_variant_resumes_from_its_checkpoint(sweep):
    out, calls, _ = sweep
    assert calls[0] == 1  # stopped at step 1: not finished
    rec = _record(out, "adaptive")
    assert rec["state"] == "finished" and rec["attempts"] == 2
    train_log = (out / "adaptive" / "seed0" / "train.log").read_text()
    assert "resumed from" in train_log and "at step 1" in train_log
    status = json.loads((out / "adaptive" / "seed0" / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 2


def test_failing_variant_is_reported_and_the_others_run(sweep):
    out, calls, _ = sweep
    assert calls[1] == 1 and calls[2] == 0  # a failed run makes the command fail ...
    rec = _record(out, "broken")
    assert rec["state"] == "failed" and "training exit 1" in rec["error"]
    assert "config error: data.train_shards=" in rec["error"] and "nonexistent" in rec["error"]
    for name in ("none", "adaptive"):  # ... after every other run finished and was evaluated
        d = out / name / "seed0"
        ev = json.loads((d / "eval.json").read_text())
        assert {"txt_r1", "img_r1", "itc_txt_r1"} <= set(ev)
        cost = json.loads((d / "cost.json").read_text())
        assert cost["micro_batch"] == 8 and cost["flops_per_sample"] > 0
    flops = {n: json.loads((out / n / "seed0" / "cost.json").read_text())["flops_per_sample"] for n in ("none", "adaptive")}
    assert flops["adaptive"] < flops["none"]


def test_finished_runs_are_skipped(sweep):
    out, _, logs = sweep
    for name in ("none", "adaptive"):  # the third call trained and evaluated nothing again
        assert (out / name / "seed0" / "sweep.log").read_text() == logs[name]
        assert _record(out, name)["attempts"] == (1 if name == "none" else 2)


def test_report_after_the_runs(sweep):
    out, _, _ = sweep
    result = json.loads((out / "compare.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["none"]["status"] == "finished" and rows["broken"]["status"] == "failed"
    tokens = rows["adaptive"]["tokens_per_layer"]  # the padded lengths, at most ELIP's 64 patches -> 48, 25 (+ 2)
    assert tokens[0] == 65 and all(n <= bound for n, bound in zip(tokens, [65, 50, 50, 27])) and tokens[-1] < 27
    logged = [json.loads(line) for line in (out / "adaptive" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    budgets = [m for m in logged if "tokens/budget_1_mean" in m]
    assert budgets and all(3 <= m["tokens/budget_1_mean"] <= 25 and m["tokens/budget_1_std"] >= 0 for m in budgets)
    assert rows["adaptive"]["ratios"]["flops_per_sample"] < 1
    assert (out / "quality_vs_flops.png").is_file() and (out / "learning_curves.png").is_file()
