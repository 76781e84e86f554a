"""``table``: the paper's Table 1, every backbone x reduction, each backbone's methods side by side."""
from __future__ import annotations

from pipeline.bench.harness import batch_repeats, check_targets, device, format_table, methods_arg, run_side_by_side
from pipeline.bench.models import BACKBONE_CONFIGS, describe
from pipeline.bench.step import PAPER, TARGETS, paper_ratio, step_cases

HELP = "the paper's Table 1: every backbone x reduction, ratios to none"
QUICK = "batch 2 and 3 repeats (same models)"
REPEATS = "timed steps per method; 0 = FLOPs and bytes only"
TABLE_BATCH = 36  # the paper's Table 1 batch: FLOPs are linear in the batch, so they are scaled to it
COLUMNS = [
    ("backbone", "backbone", "{}"),
    ("method", "method", "{}"),
    ("tflops_at_36", "TFLOPs@36", "{:.2f}"),
    ("flops_ratio", "x", "{:.3f}"),
    ("wall_s", "latency s", "{:.3f}"),
    ("wall_s_ratio", "x", "{:.3f}"),
    ("activation_gib", "act GiB", "{:.2f}"),
    ("activation_bytes_ratio", "x", "{:.3f}"),
    ("peak_cuda_gib", "CUDA peak GiB", "{:.2f}"),
    ("peak_cuda_bytes_ratio", "x", "{:.3f}"),
]


def add_arguments(parser) -> None:
    parser.add_argument("--backbones", default=",".join(PAPER), help="comma-separated (default: all)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the reductions (default: all)")


def run(args) -> list[dict]:
    dev = device()
    batch, repeats = batch_repeats(args)
    print(f"[bench] table: one full pre-training step (all losses, forward + backward) per backbone and "
          f"reduction, paper-size models (random init) at batch {batch} on {dev}; TFLOPs@36 = measured "
          f"FLOPs x {TABLE_BATCH}/{batch} (FLOPs are linear in the batch); latency, activation bytes saved "
          f"for backward and CUDA peak memory at batch {batch}; every ratio is to 'none' of the same backbone",
          flush=True)
    rows, lines = [], []
    for backbone in args.backbones.split(","):
        if backbone not in BACKBONE_CONFIGS:
            raise ValueError(f"--backbones: unknown backbone {backbone!r}; known: {sorted(BACKBONE_CONFIGS)}")
        cases, methods, size = step_cases(backbone, batch, dev, only=methods_arg(args))
        print(f"[bench] {backbone} at {size}px: {describe(methods)}", flush=True)
        part = run_side_by_side(cases, repeats)
        for row in part:
            row["backbone"] = backbone
            row["tflops_at_36"] = row["flops"] * TABLE_BATCH / batch / 1e12
            row["activation_gib"] = row["activation_bytes"] / 2**30
            if "peak_cuda_bytes" in row:
                row["peak_cuda_gib"] = row["peak_cuda_bytes"] / 2**30
        rows += part
        paper = PAPER[backbone]
        lines.append(f"{backbone}: paper (ELIP/base) {paper['tflops'][0]}/{paper['tflops'][1]} TFLOPs "
                     f"= {paper_ratio(backbone, 'tflops'):.3f}x, {paper['memory_gb'][0]}/{paper['memory_gb'][1]} GB "
                     f"= {paper_ratio(backbone, 'memory_gb'):.3f}x")
        lines += [f"{backbone:6s} {line}" for line in check_targets(part, TARGETS[backbone])]
    print(format_table(rows, COLUMNS))
    print("\n".join(lines))
    return rows
