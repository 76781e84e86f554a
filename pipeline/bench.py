"""Side-by-side benchmarks: every method measured in one process, reported as ratios to ``none``.

    python -m pipeline.bench tokens [--quick] [--json]

FLOPs and activation bytes are deterministic and back the claims; wall time is a median over
repeats taken round-robin across methods (so drift hits all of them alike) and is only
meaningful as a ratio. With ``--json`` the last line printed is one JSON object ``{"rows": [...]}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from pipeline.eval.profile import measure_step, peak_cuda_bytes

BASELINE = "none"


@dataclass
class Case:
    """One method under test: ``step()`` runs forward + backward once."""

    method: str
    step: Callable[[], None]
    params: list[torch.Tensor]
    extra: dict = field(default_factory=dict)  # columns known without running (token_layers...)


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
    log(f"[bench] timing {len(cases)} methods round-robin, {warmup} warm-up + {repeats} repeats each")
    times: dict[str, list[float]] = {c.method: [] for c in cases}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for rep in range(warmup + repeats):
        for case in cases:
            sync()
            start = time.perf_counter()
            case.step()
            sync()
            if rep >= warmup:
                times[case.method].append(time.perf_counter() - start)
    for row in rows:
        samples = sorted(times[row["method"]])
        row["wall_s"] = samples[len(samples) // 2]
    add_ratios(rows)
    return rows


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


COST_COLUMNS = [
    ("flops", "GFLOPs", "{:.1f}"),
    ("flops_ratio", "x", "{:.3f}"),
    ("activation_bytes", "act MiB", "{:.1f}"),
    ("activation_bytes_ratio", "x", "{:.3f}"),
    ("wall_s", "wall s", "{:.3f}"),
    ("wall_s_ratio", "x", "{:.3f}"),
]


def _scaled(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        row = dict(row)
        row["flops"] = row["flops"] / 1e9
        row["activation_bytes"] = row["activation_bytes"] / 2**20
        out.append(row)
    return out


# -- tokens: one ViT encoder, every reduction -------------------------------------------------
TOKENS_TARGETS = {
    "elip-reuse": {"flops": 0.75, "activation_bytes": 0.75, "wall_s": 0.82},
    "elip-lookahead": {"activation_bytes": 0.78},
}


def token_methods(tome_r: int = 10, evit_keep_rate: float = 0.7):
    """The compared reductions for a 12-layer ViT. ToMe r=10 and EViT 0.7 at layers 3/6/9 keep
    about as many token-layers as ELIP's default plan (ViT-B/16 at 224: 1704 and 1652 vs 1684)."""
    from pipeline.tokens.plan import ReductionConfig

    return {
        "none": ReductionConfig(method="none"),
        "elip-lookahead": ReductionConfig(method="elip", elip_mode="lookahead"),
        "elip-reuse": ReductionConfig(method="elip", elip_mode="reuse"),
        "tome": ReductionConfig(method="tome", r=tome_r),
        "evit": ReductionConfig(method="evit", keep_rate=evit_keep_rate),
    }


def bench_tokens(args) -> list[dict]:
    from pipeline.models.vit import VisionEncoder, VitConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (2 if args.quick else 8)
    repeats = args.repeats or (3 if args.quick else 5)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, args.image_size, args.image_size, generator=gen).to(device)
    cases = []
    for method, reduction in token_methods(args.tome_r, args.evit_keep_rate).items():
        torch.manual_seed(0)  # identical weights for every method
        enc = VisionEncoder(VitConfig(model_name=args.model, image_size=args.image_size, reduction=reduction))
        enc = enc.to(device).train()
        text_cls = torch.randn(batch, enc.embed_dim, generator=gen).to(device)

        def step(enc=enc, text_cls=text_cls):
            enc.zero_grad(set_to_none=True)
            enc(images, text_cls=text_cls).tokens.float().square().mean().backward()

        lengths = enc.expected_tokens_per_layer()
        cases.append(Case(method, step, list(enc.parameters()), {"token_layers": sum(lengths)}))
    print(
        f"[bench] tokens: {args.model} at {args.image_size}px, batch {batch}, one training step "
        f"(forward + backward) per method on {device}; ToMe r={args.tome_r}, EViT keep {args.evit_keep_rate} "
        f"at layers 3/6/9; ELIP 0.9/0.65/0.4 before layers 2/4/10, guided by a text [CLS]",
        flush=True,
    )
    rows = run_side_by_side(cases, repeats)
    print(format_table(_scaled(rows), [("method", "method", "{}"), ("token_layers", "token-layers", "{}"),
                                       ("token_layers_ratio", "x", "{:.3f}"), *COST_COLUMNS]))
    print("\n".join(check_targets(rows, TOKENS_TARGETS)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    tokens = sub.add_parser("tokens", help="one ViT encoder, one training step per reduction method")
    tokens.add_argument("--quick", action="store_true", help="batch 2 and 3 repeats (same model)")
    tokens.add_argument("--json", action="store_true", help="end with one JSON line {'rows': [...]}")
    tokens.add_argument("--model", default="vit_base_patch16_224", help="timm ViT name")
    tokens.add_argument("--image-size", type=int, default=224)
    tokens.add_argument("--batch", type=int, default=None)
    tokens.add_argument("--repeats", type=int, default=None)
    tokens.add_argument("--tome-r", type=int, default=10)
    tokens.add_argument("--evit-keep-rate", type=float, default=0.7)
    args = parser.parse_args(argv)

    rows = {"tokens": bench_tokens}[args.bench](args)
    if args.json:
        print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
