"""``python -m pipeline.compare report SWEEP_DIR``: compare.md, compare.json, compare.csv, the
plots (``plots``) and TensorBoard hparams for one sweep directory."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

from pipeline.files import atomic_write_text

from .gather import COSTS, gather

# eval.json keys in the order the table shows them; any other metric follows, sorted
ORDER = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean",
         "itc_txt_r1", "itc_txt_r5", "itc_txt_r10", "itc_img_r1", "itc_img_r5", "itc_img_r10",
         "bleu_4", "meteor", "cider")
LABELS = {"txt_r1": "TR@1", "txt_r5": "TR@5", "txt_r10": "TR@10", "img_r1": "IR@1", "img_r5": "IR@5",
          "img_r10": "IR@10", "r_mean": "R mean", "itc_txt_r1": "ITC TR@1", "itc_txt_r5": "ITC TR@5",
          "itc_txt_r10": "ITC TR@10", "itc_img_r1": "ITC IR@1", "itc_img_r5": "ITC IR@5", "itc_img_r10": "ITC IR@10",
          "bleu_4": "BLEU-4", "meteor": "METEOR", "cider": "CIDEr"}
HIDDEN = ("txt_r_mean", "img_r_mean")  # in the JSON, not worth a column


def metric_columns(rows: list[dict]) -> list[str]:
    found = {k for r in rows for k in r["metrics"]} - set(HIDDEN)
    chance = sorted(k for k in found if k.startswith("chance_"))
    return [k for k in ORDER if k in found] + sorted(found - set(ORDER) - set(chance)) + chance


def _pm(mean, std, fmt="{:.2f}") -> str:
    if mean is None:
        return "-"
    return fmt.format(mean) + ("" if std is None else " ± " + fmt.format(std))


def _bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _flops(n) -> str:
    return "-" if n is None else (f"{n / 1e12:.3f} T" if n >= 1e11 else f"{n / 1e9:.3f} G")


def _ratio(row: dict, key: str) -> str:
    r = row["ratios"].get(key)
    return "" if r is None else f" ({r:.2f}x)"


def markdown(result: dict) -> str:
    rows, baseline = result["rows"], result["baseline"]
    cols = metric_columns(rows)
    seeds = result["seeds"]
    out = [f"# Sweep comparison ({result.get('sweep')})", "",
           f"Baseline: `{baseline}`; seeds {seeds}; mean ± standard deviation over the finished seeds "
           "(every seed's value is in compare.json)."
           + (f" Extra overrides: `{' '.join(result['extra_overrides'])}`." if result.get("extra_overrides") else ""),
           "", "## Quality", "",
           "| variant | status | seeds | " + " | ".join(LABELS.get(c, c) for c in cols) + " |",
           "|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        cells = [_pm(r["metrics"].get(c), r["metrics_std"].get(c)) for c in cols]
        out.append(f"| {r['name']} | {r['status']} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    kinds = {r["memory_kind"] for r in rows} - {None}
    mem_label = ("peak memory / rank (CUDA max allocated)" if kinds == {"cuda_max_allocated"} else
                 "activations (bytes saved for backward, CPU)" if kinds == {"saved_for_backward"} else
                 "memory (see memory_kind in compare.json)")
    out += ["", "## Cost (measured on each run's configuration; ratios to the baseline)", "",
            f"| variant | FLOPs / sample (train step) | {mem_label} | samples/s (median) | wall clock s "
            "| vision tokens per layer | micro-batch | budget matched |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r.get("match")
        matched = (f"{m['key'].rsplit('.', 1)[-1]}={m['value']}: {m['kind']} {m['measured']:.4g} vs {m['reference']} "
                   f"{m['target']:.4g}" + ("" if m["within_tolerance"] else " (OUTSIDE tolerance)")) if m else ""
        tokens = ">".join(str(t) for t in r["tokens_per_layer"]) if r["tokens_per_layer"] else "-"
        out.append(f"| {r['name']} | {_flops(r['flops_per_sample'])}{_ratio(r, 'flops_per_sample')} "
                   f"| {_bytes(r['peak_memory_bytes'])}{_ratio(r, 'peak_memory_bytes')} "
                   f"| {_pm(r['samples_per_s'], r['std'].get('samples_per_s'), '{:.1f}')}{_ratio(r, 'samples_per_s')} "
                   f"| {_pm(r['wall_s'], r['std'].get('wall_s'), '{:.0f}')}{_ratio(r, 'wall_s')} "
                   f"| {tokens} | {'-' if r['micro_batch'] is None else int(r['micro_batch'])} | {matched} |")
    out += ["", "## Differences to the baseline", "", *result["judgement"]]
    failed = [(r["name"], seed, err) for r in rows for seed, err in r["errors"].items()]
    if failed:
        out += ["", "## Runs without a result", ""]
        out += [f"- {name} seed {seed}: {err}" for name, seed, err in failed]
    return "\n".join(out) + "\n"


def csv_text(result: dict) -> str:
    rows = result["rows"]
    cols = metric_columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["variant", "status", "seeds", *[x for c in cols for x in (c, c + "_std")],
                *[x for c in COSTS for x in (c, c + "_std", c + "_ratio")], "memory_kind", "tokens_per_layer"])
    for r in rows:
        w.writerow([r["name"], r["status"], len(r["seeds"]),
                    *[x for c in cols for x in (r["metrics"].get(c), r["metrics_std"].get(c))],
                    *[x for c in COSTS for x in (r.get(c), r["std"].get(c), r["ratios"].get(c))],
                    r["memory_kind"], " ".join(map(str, r["tokens_per_layer"] or []))])
    return buf.getvalue()


def write_hparams(sweep_dir: Path, result: dict) -> None:
    """One TensorBoard hparams entry per finished run under SWEEP_DIR/hparams/NAME/seedS
    (rewritten each time), so that ``tensorboard --logdir SWEEP_DIR`` compares them."""
    from torch.utils.tensorboard import SummaryWriter

    root = sweep_dir / "hparams"
    shutil.rmtree(root, ignore_errors=True)
    for row in result["rows"]:
        for run in row["per_seed"]:
            if run["status"] != "finished":
                continue
            writer = SummaryWriter(str(root / row["name"] / f"seed{run['seed']}"))
            hp = {"variant": row["name"], "seed": run["seed"], "micro_batch": int(run.get("micro_batch") or 0)}
            metrics = {f"quality/{k}": v for k, v in run.get("metrics", {}).items()}
            metrics.update({f"cost/{k}": float(run[k]) for k in COSTS if run.get(k) is not None})
            writer.add_hparams(hp, metrics, run_name=".")
            writer.close()


def write_report(sweep_dir: Path) -> str:
    """Write everything; returns the markdown table (what a person reads)."""
    from .plots import write_plots

    sweep_dir = Path(sweep_dir)
    result = gather(sweep_dir)
    result["plots"] = write_plots(sweep_dir, result)
    md = markdown(result)
    atomic_write_text(sweep_dir / "compare.md", md)
    atomic_write_text(sweep_dir / "compare.json", json.dumps(result, indent=1))
    atomic_write_text(sweep_dir / "compare.csv", csv_text(result))
    write_hparams(sweep_dir, result)
    return md + "\nplots: " + ", ".join(str(sweep_dir / p) for p in result["plots"]) + "\n"
