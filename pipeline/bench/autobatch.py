"""``autobatch``: the micro-batch each reduction admits in the unpruned model's memory."""
from __future__ import annotations

import torch

from pipeline.bench.harness import BASELINE, device, format_table
from pipeline.bench.models import BACKBONE_CONFIGS, backbone_methods, describe, paper_model

HELP = "micro-batch each reduction admits in the unpruned model's memory"
QUICK = "read each answer off a line fitted at batch 2 and 4"
BATCH = "the unpruned model's batch that sets the budget (40)"
TARGET = 1.35  # ELIP admits at least this times the unpruned batch (paper: 1.33-1.5x)


def add_arguments(parser) -> None:
    parser.add_argument("--backbone", default="albef", choices=sorted(BACKBONE_CONFIGS))
    parser.add_argument("--image-size", type=int, default=None, help="default: the backbone's pre-training size")
    parser.add_argument("--methods", default=None, help="comma-separated subset (none is always measured)")


def run(args) -> list[dict]:
    """Under one budget -- the unpruned model's memory at ``--batch`` (the paper's 40) -- the
    micro-batch each reduction admits, found by :mod:`pipeline.train.autobatch` (CUDA peak on GPU,
    saved bytes on CPU). ``--quick`` fits each method's line from probes at batch 2 and 4 and
    reads the answer off it; saved bytes are exactly linear in the batch, so on CPU it matches
    the verified search at a fraction of the cost."""
    from pipeline.train import autobatch as ab
    from pipeline.config import ExperimentConfig
    from pipeline.models import build_model
    from pipeline.models.layers import DTYPES

    dev = device()
    precision = "bf16" if dev.type == "cuda" else "fp32"
    dtype = DTYPES[precision]
    batch = args.batch or 40  # the paper's ALBEF batch per GPU
    described = describe(backbone_methods(args.backbone, args.image_size))
    methods = backbone_methods(args.backbone, args.image_size,
                               [BASELINE, *args.methods.split(",")] if args.methods else None)
    print(f"[bench] autobatch: {args.backbone} (paper size, random init), budget = the unpruned model's memory at "
          f"batch {batch} ({'CUDA peak' if dev.type == 'cuda' else 'activation bytes saved for backward'} + "
          f"model states, ZeRO-2 over 8 ranks, {precision}) on {dev}; "
          f"{'line from probes at 2 and 4' if args.quick else 'verified by probes'}; {described}", flush=True)
    rows, budget = [], None
    for method, reduction in methods.items():  # none first: it sets the budget
        model_cfg = paper_model(args.backbone, reduction, args.image_size)
        cfg = ExperimentConfig(model=model_cfg)
        cfg.data.image_size, cfg.data.max_words = model_cfg.vision.image_size, 30
        torch.manual_seed(0)
        model = build_model(model_cfg).to(dev, dtype).train()
        states = ab.model_state_bytes(model, precision, zero_stage=2, world_size=8)
        measure = ab.activation_meter(model, cfg, dev, dtype)
        if args.quick:
            line = ab.find_micro_batch(measure, 2**62, states, 4, verify=False)
            if budget is None:  # the unpruned model at the budget's batch, read off its line
                budget = int(states + line.fixed_bytes + line.bytes_per_sample * batch)
            result = ab.find_micro_batch(lambda b, probes=iter(line.probes): next(probes).activation_bytes, budget,
                                         states, 4, max_batch=8 * batch, verify=False)
        else:
            if budget is None:
                budget = states + measure(batch)
            result = ab.find_micro_batch(measure, budget, states, batch, max_batch=8 * batch)
        rows.append({"method": method, "micro_batch": result.micro_batch,
                     "bytes_per_sample": int(result.bytes_per_sample), "fixed_bytes": int(result.fixed_bytes)})
        print(f"[bench] {method}: micro-batch {result.micro_batch} ({len(result.probes)} probes)", flush=True)
        del model
    for row in rows:
        row["batch_ratio"] = row["micro_batch"] / rows[0]["micro_batch"]
    table = [dict(r, mib_per_sample=r["bytes_per_sample"] / 2**20) for r in rows]
    print(format_table(table, [("method", "method", "{}"), ("micro_batch", "micro-batch", "{}"),
                               ("batch_ratio", "x unpruned", "{:.2f}"), ("mib_per_sample", "MiB/sample", "{:.1f}")]))
    missed = [f"{r['method']}: admits {r['batch_ratio']:.2f}x the unpruned batch, target >= {TARGET}"
              for r in rows if r["method"].startswith("elip") and r["batch_ratio"] < TARGET]
    print("[bench] targets: " + ("; ".join(missed) if missed else f"met (ELIP >= {TARGET}x)"))
    return rows
