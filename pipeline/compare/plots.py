"""The sweep report's PNGs (matplotlib, no display): quality against training FLOPs per sample
with the Pareto front, quality against wall clock, and the main losses' learning curves read
from each run's TensorBoard events."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402

PRIMARY = {"retrieval": "r_mean", "caption": "cider"}
MAX_LOSS_PANELS = 4


def primary_metric(rows: list[dict]) -> str | None:
    """The quality the scatter plots put on the y axis: the task's summary metric."""
    tasks = {r["task"] for r in rows if r["task"]}
    for task in tasks:
        if task in PRIMARY and any(PRIMARY[task] in r["metrics"] for r in rows):
            return PRIMARY[task]
    names = [k for r in rows for k in r["metrics"] if not k.startswith("chance_")]
    return names[0] if names else None


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (less or equal cost and more or equal quality,
    one of them strictly), ordered by cost. ``points``: ``(cost, quality)``."""
    front = []
    for i, (c, q) in enumerate(points):
        dominated = any((c2 <= c and q2 >= q) and (c2 < c or q2 > q) for j, (c2, q2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _scatter(path: Path, rows: list[dict], metric: str, xkey: str, xlabel: str, scale: float, front: bool) -> bool:
    pts = [r for r in rows if r["seeds"] and r.get(xkey) is not None and metric in r["metrics"]]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = [r[xkey] / scale for r in pts]
    ys = [r["metrics"][metric] for r in pts]
    xerr = [(r["std"].get(xkey) or 0.0) / scale for r in pts]
    yerr = [r["metrics_std"].get(metric) or 0.0 for r in pts]
    ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o", capsize=3)
    for x, y, r in zip(xs, ys, pts):
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if front:
        idx = pareto_front(list(zip(xs, ys)))
        ax.plot([xs[i] for i in idx], [ys[i] for i in idx], "--", color="tab:red", label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def read_scalars(event_dir: Path, prefix: str = "train/loss") -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value)]}`` of the scalar tags starting with ``prefix`` in a TensorBoard dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not event_dir.is_dir():
        return {}
    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags().get("scalars", []) if tag.startswith(prefix)}


def _curves(path: Path, rows: list[dict]) -> bool:
    series: dict[str, list[tuple[str, int, list]]] = {}
    for ci, r in enumerate(rows):
        for run in r["per_seed"]:
            for tag, points in read_scalars(Path(run["run_dir"]) / "tensorboard").items():
                series.setdefault(tag, []).append((r["name"], ci, points))
    tags = sorted(series, key=lambda t: (t != "train/loss", t))[:MAX_LOSS_PANELS]
    if not tags:
        return False
    fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, tag in zip(axes[0], tags):
        labelled = set()
        for name, ci, points in series[tag]:
            steps, values = zip(*points)
            ax.plot(steps, values, color=colours[ci % len(colours)], alpha=0.8, lw=1,
                    label=None if name in labelled else name)
            labelled.add(name)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(sweep_dir: Path, result: dict) -> list[str]:
    """Write the PNGs that have data; returns their file names."""
    rows, written = result["rows"], []
    metric = primary_metric(rows)
    if metric:
        flops = [r["flops_per_sample"] for r in rows if r.get("flops_per_sample")]
        scale, unit = (1e12, "TFLOPs") if flops and max(flops) >= 1e11 else (1e9, "GFLOPs")
        if _scatter(sweep_dir / "quality_vs_flops.png", rows, metric, "flops_per_sample",
                    f"training {unit} per sample (one measured step)", scale, front=True):
            written.append("quality_vs_flops.png")
        if _scatter(sweep_dir / "quality_vs_wall.png", rows, metric, "wall_s", "training wall clock (s)", 1.0,
                    front=True):
            written.append("quality_vs_wall.png")
    if _curves(sweep_dir / "learning_curves.png", rows):
        written.append("learning_curves.png")
    return written

