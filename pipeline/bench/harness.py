"""The measurement harness: every case of a benchmark measured in one process, side by side,
reported as ratios to a baseline row.

FLOPs and activation bytes are deterministic and back the claims; wall time is a median over
repeats taken round-robin across cases (so drift hits all of them alike) and is only
meaningful as a ratio.
"""
from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch

from pipeline.device import pick_device as device  # noqa: F401 - the benchmarks' device: the GPU when there is one
from pipeline.train.profile import measure_step, peak_cuda_bytes, timed_call

BASELINE = "none"
STEP_CAPTION = "two red circles at the top left and a blue square in the bottom right of the picture"

COST_COLUMNS = [
    ("flops", "GFLOPs", "{:.1f}"),
    ("flops_ratio", "x", "{:.3f}"),
    ("activation_bytes", "act MiB", "{:.1f}"),
    ("activation_bytes_ratio", "x", "{:.3f}"),
    ("wall_s", "wall s", "{:.3f}"),
    ("wall_s_ratio", "x", "{:.3f}"),
]


@dataclass
class Case:
    """One method under test: ``step()`` runs forward + backward once."""

    method: str
    step: Callable[[], None]
    params: list[torch.Tensor]
    extra: dict = field(default_factory=dict)  # columns known without running (token_layers...)


def batch_repeats(args: argparse.Namespace) -> tuple[int, int]:
    """``--batch`` / ``--repeats``, or their defaults: 2 and 3 with ``--quick``, else 8 and 5."""
    batch = args.batch or (2 if args.quick else 8)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    return batch, repeats


def methods_arg(args: argparse.Namespace) -> list[str] | None:
    """``--methods a,b`` as a list; None for all."""
    return args.methods.split(",") if args.methods else None


def run_side_by_side(cases: list[Case], repeats: int, warmup: int = 1, log=print) -> list[dict]:
    """Measure every case; returns one row per case with absolute numbers and ``*_ratio``s."""
    rows = []
    for case in cases:
        log(f"[bench] {case.method}: counting FLOPs and saved activations")
        cost = measure_step(case.step, case.params)
        row = {"method": case.method, **case.extra, "flops": cost.flops, "activation_bytes": cost.activation_bytes}
        peak = peak_cuda_bytes(case.step)
        if peak is not None:
            row["peak_cuda_bytes"] = peak
        rows.append(row)
    if repeats == 0:  # deterministic costs only
        add_ratios(rows)
        return rows
    log(f"[bench] timing {len(cases)} methods round-robin, {warmup} warm-up + {repeats} repeats each")
    times: dict[str, list[float]] = {c.method: [] for c in cases}
    for rep in range(warmup + repeats):
        for case in cases:
            seconds = timed_call(case.step)
            if rep >= warmup:
                times[case.method].append(seconds)
    for row in rows:
        row["wall_s"] = statistics.median(times[row["method"]])
    add_ratios(rows)
    return rows


def report(rows: list[dict], columns: list[tuple[str, str, str]], targets: dict) -> None:
    """Print a benchmark's table (GFLOPs, MiB) and its target checks."""
    print(format_table(scaled(rows), columns))
    print("\n".join(check_targets(rows, targets)))


def add_ratios(rows: list[dict], baseline: str = BASELINE, key: str = "method") -> None:
    """Add ``<col>_ratio`` = value / baseline's value for every numeric column."""
    base = next(r for r in rows if r[key] == baseline)
    for row in rows:
        for col, value in list(row.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not col.endswith("_ratio"):
                if base.get(col):
                    row[f"{col}_ratio"] = value / base[col]


def check_targets(rows: list[dict], targets: dict[str, dict[str, float]], key: str = "method") -> list[str]:
    """Lines ``method col ratio <= target: ok|MISSED`` for every target."""
    lines = []
    by_name = {r[key]: r for r in rows}
    for name, cols in targets.items():
        for col, limit in cols.items():
            if name not in by_name or f"{col}_ratio" not in by_name[name]:
                continue  # not measured in this run (--methods, --repeats 0)
            ratio = by_name[name][f"{col}_ratio"]
            verdict = "ok" if ratio <= limit else "MISSED"
            lines.append(f"{name:16s} {col:17s} {ratio:6.3f}x  target <= {limit:.2f}x  {verdict}")
    return lines


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` are ``(row key, header, format)``."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([fmt.format(row[k]) if k in row else "-" for k, _, fmt in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def scaled(rows: list[dict]) -> list[dict]:
    """Copies of ``rows`` with FLOPs in G and activation bytes in MiB, for display."""
    out = []
    for row in rows:
        row = dict(row)
        row["flops"] = row["flops"] / 1e9
        row["activation_bytes"] = row["activation_bytes"] / 2**20
        out.append(row)
    return out
