"""Read one sweep directory: per run what it measured, per variant mean and spread over seeds.

Everything comes from files the runs wrote: ``eval.json`` (quality), ``cost.json`` (one
measured training step), ``metrics.jsonl`` (samples/s, tokens per layer, CUDA peak),
``sweep_run.json`` (state, wall clock, error), ``NAME/match.json`` (a matched budget).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from pipeline.config import ConfigError

# quantities measured per run, next to the quality metrics
COSTS = ("flops_per_sample", "peak_memory_bytes", "samples_per_s", "wall_s", "micro_batch")
MEMORY_KINDS = {"cuda": "cuda_max_allocated", "cpu": "saved_for_backward"}
# the metrics a sentence is written about, per task (the rest are in the table)
HEADLINE = {"retrieval": ("txt_r1", "img_r1", "r_mean"), "caption": ("cider", "bleu_4")}
SKIP_METRICS = ("step", "num_images", "num_texts")  # sizes, not scores


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None


def _metrics_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def quality(eval_json: dict) -> dict[str, float]:
    """The numeric top-level entries of an eval.json (downstream scores included, whatever they are)."""
    return {k: float(v) for k, v in eval_json.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in SKIP_METRICS}


def read_run(run_dir: Path, seed: int) -> dict:
    """What one run measured; ``status`` says if it is usable (``finished``) and ``error`` why not."""
    record = _json(run_dir / "sweep_run.json") or {}
    state = record.get("state") or "not run"
    if state == "training":  # the runner writes it before it starts the trainer
        state = "training or interrupted"
    row = {"seed": seed, "run_dir": str(run_dir), "status": state, "error": record.get("error")}
    ev = _json(run_dir / "eval.json")
    cost = _json(run_dir / "cost.json")
    if row["status"] == "finished" and (ev is None or cost is None):
        row.update(status="incomplete", error="no eval.json" if ev is None else "no cost.json")
    if ev is not None:
        row["metrics"] = quality(ev)
    logged = _metrics_rows(run_dir / "metrics.jsonl")
    rates = [r["perf/samples_per_s"] for r in logged if "perf/samples_per_s" in r]
    row["samples_per_s"] = statistics.median(rates) if rates else None
    token_rows = [r for r in logged if any(k.startswith("tokens/layer_") for k in r)]
    if token_rows:
        last = token_rows[-1]
        row["tokens_per_layer"] = [int(round(last[k])) for k in sorted(k for k in last if k.startswith("tokens/layer_"))]
    # a run the sweep runner never trained (a SLURM array task's training job) has no wall clock here
    row["wall_s"] = None if record.get("attempts") == 0 else record.get("train_s")
    if cost is not None:
        row["flops_per_sample"] = cost.get("flops_per_sample")
        row["micro_batch"] = cost.get("micro_batch")
        cuda = [r["mem/cuda_max_allocated_gb"] for r in logged if "mem/cuda_max_allocated_gb" in r]
        if cost.get("device") == "cuda" and cuda:
            row["peak_memory_bytes"], row["memory_kind"] = max(cuda) * 2**30, MEMORY_KINDS["cuda"]
        else:
            row["peak_memory_bytes"], row["memory_kind"] = cost.get("activation_bytes"), MEMORY_KINDS["cpu"]
        row["task"] = cost.get("task")
    return row


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def variant_row(name: str, runs: list[dict], match: dict | None) -> dict:
    """Mean and spread over a variant's finished seeds; every seed's values in ``per_seed``."""
    done = [r for r in runs if r["status"] == "finished"]
    if len(done) == len(runs):
        status = "finished"
    elif done:
        status = f"partial: {len(done)}/{len(runs)} seeds"
    else:
        first = next((r for r in runs if r["status"] != "finished"), runs[0])
        status = first["status"] if first["status"] in ("not run",) else f"{first['status']}"
    row = {"name": name, "variant": name, "status": status, "seeds": [r["seed"] for r in done],
           "per_seed": runs, "metrics": {}, "metrics_std": {}, "std": {}, "match": match,
           "errors": {str(r["seed"]): (r.get("error") or "").splitlines()[0] if r.get("error") else r["status"]
                      for r in runs if r["status"] != "finished"}}
    names = sorted({k for r in done for k in r.get("metrics", {})})
    for k in names:
        vals = [r["metrics"][k] for r in done if k in r.get("metrics", {})]
        s = _spread(vals)
        row["metrics"][k], row["metrics_std"][k] = s["mean"], s["std"]
    for k in COSTS:
        vals = [r[k] for r in done if r.get(k) is not None]
        if vals:
            s = _spread(vals)
            row[k], row["std"][k] = s["mean"], s["std"]
        else:
            row[k] = None
    kinds = {r.get("memory_kind") for r in done} - {None}
    row["memory_kind"] = kinds.pop() if len(kinds) == 1 else (None if not kinds else "mixed")
    tokens = [r.get("tokens_per_layer") for r in done if r.get("tokens_per_layer")]
    row["tokens_per_layer"] = tokens[0] if tokens else None
    row["token_layers"] = sum(tokens[0]) if tokens else None
    tasks = {r.get("task") for r in done} - {None}
    row["task"] = tasks.pop() if tasks else None
    return row


def add_ratios(rows: list[dict], baseline: str) -> None:
    """``ratios`` (cost / baseline's) and ``deltas`` (metric - baseline's) on every row."""
    base = next((r for r in rows if r["name"] == baseline), None)
    for row in rows:
        row["ratios"], row["deltas"] = {}, {}
        if base is None or base["status"] != "finished" and not base["seeds"]:
            continue
        for k in COSTS:
            if row.get(k) is not None and base.get(k):
                row["ratios"][k] = row[k] / base[k]
        for k, v in row["metrics"].items():
            if k in base["metrics"]:
                row["deltas"][k] = v - base["metrics"][k]


def judge(rows: list[dict], baseline: str) -> list[str]:
    """Sentences saying which headline differences to the baseline exceed the seeds' spread
    (|difference of means| > sum of the two standard deviations) and which do not."""
    base = next((r for r in rows if r["name"] == baseline), None)
    if base is None or not base["seeds"]:
        return [f"The baseline {baseline!r} has no finished run: no differences can be judged."]
    lines = []
    keys = HEADLINE.get(base.get("task"), tuple(list(base["metrics"])[:2]))
    for row in rows:
        if row["name"] == baseline:
            continue
        if not row["seeds"]:
            lines.append(f"- {row['name']}: no finished run ({row['status']}).")
            continue
        parts = []
        for k in keys:
            if k not in row["metrics"] or k not in base["metrics"]:
                continue
            d = row["metrics"][k] - base["metrics"][k]
            sa, sb = row["metrics_std"].get(k), base["metrics_std"].get(k)
            if sa is None or sb is None:
                parts.append(f"{k} {d:+.2f} (one seed on a side: no spread to judge it by)")
            elif abs(d) > sa + sb:
                parts.append(f"{k} {d:+.2f} exceeds the spread (±{sa + sb:.2f})")
            else:
                parts.append(f"{k} {d:+.2f} is within the spread (±{sa + sb:.2f})")
        if parts:
            lines.append(f"- {row['name']} vs {baseline}: " + "; ".join(parts) + ".")
    return lines


def gather(sweep_dir: Path) -> dict:
    """``{"baseline", "sweep", "rows": [...], "judgement": [...]}`` for a sweep directory."""
    sweep_dir = Path(sweep_dir)
    info = _json(sweep_dir / "sweep.json")
    if info is None:
        raise ConfigError(f"{sweep_dir}: no sweep.json (not a directory written by python -m pipeline.compare run)")
    seeds, baseline = info["seeds"], info["baseline"]
    rows = []
    for name in info["variants"]:
        runs = [read_run(sweep_dir / name / f"seed{s}", s) for s in seeds]
        rows.append(variant_row(name, runs, _json(sweep_dir / name / "match.json")))
    add_ratios(rows, baseline)
    return {"baseline": baseline, "sweep": info.get("path"), "seeds": seeds,
            "extra_overrides": info.get("extra_overrides", []), "rows": rows, "judgement": judge(rows, baseline)}

