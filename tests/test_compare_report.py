"""python -m pipeline.compare report on fixture run directories: table values, spreads, ratios,
the JSON/CSV schema, a failed variant's row, and the plots and hparams written."""
import csv
import json
import math
from pathlib import Path

import pytest

from pipeline.compare.__main__ import main
from pipeline.compare.gather import gather
from pipeline.compare.plots import pareto_front

# variant -> per seed (txt_r1, img_r1); costs per variant
QUALITY = {"none": [(20.0, 18.0), (22.0, 20.0)], "elip": [(21.0, 19.0), (21.0, 19.0)], "tome": [(10.0, 9.0), (12.0, 11.0)]}
FLOPS = {"none": 4.0e9, "elip": 3.0e9, "tome": 2.5e9}
ACT = {"none": 100 * 2**20, "elip": 70 * 2**20, "tome": 60 * 2**20}
RATE = {"none": [100.0, 110.0, 120.0], "elip": [150.0, 160.0, 170.0], "tome": [200.0, 210.0, 220.0]}


def _run(root: Path, name: str, seed: int, txt: float, img: float) -> None:
    from torch.utils.tensorboard import SummaryWriter

    d = root / name / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "sweep_run.json").write_text(json.dumps({"state": "finished", "train_s": 100.0 + 10 * seed, "variant": name}))
    (d / "eval.json").write_text(json.dumps({"txt_r1": txt, "img_r1": img, "txt_r5": txt + 10, "r_mean": (txt + img) / 2,
                                             "vqa_acc": 50.0 + seed, "ranked_by": "itm", "chance_txt_r1": 0.5}))
    (d / "cost.json").write_text(json.dumps({"flops_per_sample": FLOPS[name], "activation_bytes": ACT[name],
                                             "micro_batch": 32, "task": "retrieval", "device": "cpu"}))
    rows = [{"step": 10 * (i + 1), "train/loss": 3.0 - i, "perf/samples_per_s": r,
             "tokens/layer_00": 65, "tokens/layer_01": 49} for i, r in enumerate(RATE[name])]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    w = SummaryWriter(str(d / "tensorboard"))
    for r in rows:
        w.add_scalar("train/loss", r["train/loss"], r["step"])
        w.add_scalar("train/loss_itc", r["train/loss"] / 2, r["step"])
    w.close()


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for name, seeds in QUALITY.items():
        for seed, (t, i) in enumerate(seeds):
            _run(root, name, seed, t, i)
    broken = root / "broken" / "seed0"
    broken.mkdir(parents=True)
    (broken / "sweep_run.json").write_text(json.dumps({"state": "failed", "error": "training exit 1, state None\nboom"}))
    (root / "tome" / "match.json").write_text(json.dumps({"kind": "token_layers", "key": "model.vision.reduction.r",
                                                          "override": "model.vision.reduction.r=11", "value": 11,
                                                          "measured": 194, "target": 192, "reference": "elip",
                                                          "within_tolerance": True, "relative_error": 0.01}))
    (root / "sweep.json").write_text(json.dumps({"path": "fixture.yaml", "baseline": "none", "seeds": [0, 1],
                                                 "variants": {"none": {}, "elip": {}, "tome": {}, "broken": {}}}))
    assert main(["report", str(root)]) == 0
    return root


def test_json_rows_mean_spread_ratios(sweep_dir):
    out = json.loads((sweep_dir / "compare.json").read_text())
    assert out["baseline"] == "none"
    rows = {r["name"]: r for r in out["rows"]}
    assert list(rows) == ["none", "elip", "tome", "broken"]
    none, elip, tome = rows["none"], rows["elip"], rows["tome"]
    assert none["metrics"]["txt_r1"] == pytest.approx(21.0)
    assert none["metrics_std"]["txt_r1"] == pytest.approx(math.sqrt(2.0))  # sample std of 20, 22
    assert elip["metrics_std"]["txt_r1"] == 0.0
    assert [s["metrics"]["txt_r1"] for s in none["per_seed"]] == [20.0, 22.0]  # every seed's value
    assert none["metrics"]["vqa_acc"] == pytest.approx(50.5)  # a metric the report does not know by name
    assert "ranked_by" not in none["metrics"]
    assert elip["flops_per_sample"] == 3.0e9 and elip["ratios"]["flops_per_sample"] == pytest.approx(0.75)
    assert elip["peak_memory_bytes"] == 70 * 2**20 and elip["memory_kind"] == "saved_for_backward"
    assert elip["ratios"]["peak_memory_bytes"] == pytest.approx(0.7)
    assert none["samples_per_s"] == 110.0 and elip["ratios"]["samples_per_s"] == pytest.approx(160 / 110)
    assert none["wall_s"] == pytest.approx(105.0)
    assert none["tokens_per_layer"] == [65, 49] and none["micro_batch"] == 32
    assert tome["deltas"]["txt_r1"] == pytest.approx(-10.0)
    assert tome["match"]["value"] == 11
    assert rows["broken"]["status"] == "failed" and rows["broken"]["seeds"] == []
    assert "boom" not in rows["broken"]["errors"]["0"] and "training exit 1" in rows["broken"]["errors"]["0"]


def test_words_say_which_differences_exceed_the_spread(sweep_dir):
    out = json.loads((sweep_dir / "compare.json").read_text())
    words = "\n".join(out["judgement"])
    tome_line = next(line for line in out["judgement"] if line.startswith("- tome"))
    elip_line = next(line for line in out["judgement"] if line.startswith("- elip"))
    assert "txt_r1 -10.00 exceeds the spread" in tome_line
    assert "txt_r1 +0.00 is within the spread" in elip_line
    assert "broken: no finished run (failed)" in words


def test_markdown_and_csv(sweep_dir):
    md = (sweep_dir / "compare.md").read_text()
    assert "| none | finished | 2 | 21.00 ± 1.41 |" in md
    assert "| broken | failed | 0 |" in md
    assert "3.000 G (0.75x)" in md and "70.0 MiB (0.70x)" in md
    assert "bytes saved for backward, CPU" in md
    assert "| r=11: token_layers 194 vs elip 192 |" in md
    assert "broken seed 0: training exit 1" in md
    rows = list(csv.DictReader(open(sweep_dir / "compare.csv")))
    tome = next(r for r in rows if r["variant"] == "tome")
    assert float(tome["txt_r1"]) == pytest.approx(11.0) and float(tome["flops_per_sample_ratio"]) == pytest.approx(0.625)


def test_plots_and_hparams_written(sweep_dir):
    for name in ("quality_vs_flops.png", "quality_vs_wall.png", "learning_curves.png"):
        data = (sweep_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    events = list((sweep_dir / "hparams").rglob("events.out.tfevents.*"))
    assert {p.relative_to(sweep_dir / "hparams").parts[:2] for p in events} == \
        {(n, f"seed{s}") for n in QUALITY for s in (0, 1)}


def test_pareto_front():
    # (cost, quality): b beats a (cheaper, better), c is dearer but best, d is dominated by b
    assert pareto_front([(4.0, 20.0), (3.0, 21.0), (5.0, 30.0), (3.5, 20.5)]) == [1, 2]


def test_not_a_sweep_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no sweep.json" in capsys.readouterr().err


def test_gather_reports_missing_eval_as_incomplete(tmp_path):
    d = tmp_path / "a" / "seed0"
    d.mkdir(parents=True)
    (d / "sweep_run.json").write_text(json.dumps({"state": "finished"}))
    (tmp_path / "sweep.json").write_text(json.dumps({"baseline": "a", "seeds": [0], "variants": {"a": {}}}))
    row = gather(tmp_path)["rows"][0]
    assert row["status"] == "incomplete" and row["errors"] == {"0": "no eval.json"}


def test_a_run_trained_outside_the_runner_has_no_wall_clock(tmp_path):
    """A SLURM array task trains through pretrain.sbatch and the runner only evaluates: its
    record says 0 attempts, and the report must not show a 0 s wall clock."""
    _run(tmp_path, "none", 0, 20.0, 18.0)
    _run(tmp_path, "elip", 0, 21.0, 19.0)
    record = tmp_path / "elip" / "seed0" / "sweep_run.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "train_s": 0.0, "attempts": 0}))
    (tmp_path / "sweep.json").write_text(json.dumps({"baseline": "none", "seeds": [0], "variants": {"none": {}, "elip": {}}}))
    rows = {r["name"]: r for r in gather(tmp_path)["rows"]}
    assert rows["none"]["wall_s"] == 100.0 and rows["elip"]["wall_s"] is None
