"""``python -m data_prep report DIR``: sample counts, failures by reason, top errors."""
from collections import Counter
from pathlib import Path

from . import manifest
from .errors import DataPrepError


def render(out_dir, top: int = 5) -> str:
    """The report for ``out_dir`` as text (also for incomplete, still resumable runs)."""
    out_dir = Path(out_dir)
    if not (out_dir / "_progress").is_dir():
        raise DataPrepError(f"{out_dir}: not a data_prep output directory (no _progress/ inside)")
    data = manifest.collect(out_dir)
    lines = [f"{out_dir}: {data['num_samples']} samples in {data['num_shards']} shards "
             f"from {len(data['sources'])} source run(s)"]
    totals: Counter = Counter()
    for prefix, s in sorted(data["sources"].items()):
        state = "complete" if s["complete"] else f"INCOMPLETE ({s['shards_done']}/{s['num_shards']} shards; re-run to resume)"
        kind = "eval" if s["eval"] else "train"
        ok = 100.0 * s["num_samples"] / s["num_rows"] if s["num_rows"] else 0.0
        lines.append(f"  {prefix:<16} {s['source']:<10} {kind:<5} rows {s['num_rows']:>9}  samples {s['num_samples']:>9} "
                     f"({ok:.1f}%)  shards {s['num_shards']:>5}  {state}")
        if s["failures"]:
            lines.append("      failed: " + ", ".join(f"{r} {n}" for r, n in s["failures"].items()))
        totals.update({(prefix, r): n for r, n in s["failures"].items()})
    if totals:
        lines.append(f"top errors:")
        for (prefix, reason), n in totals.most_common(top):
            example = (data["sources"][prefix]["examples"].get(reason) or [""])[0]
            lines.append(f"  {n:>7}  {prefix}: {reason:<14} e.g. {example}")
    else:
        lines.append("no failed rows")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("dir", help="an output directory of data_prep")
    parser.add_argument("--top", type=int, default=5, help="how many error kinds to show (default 5)")


def run(args) -> None:
    print(render(args.dir, args.top))
