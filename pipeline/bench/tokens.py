"""``tokens``: one ViT encoder, one training step (forward + backward) per reduction method."""
from __future__ import annotations

import torch

from pipeline.bench.harness import COST_COLUMNS, Case, batch_repeats, device, report, run_side_by_side
from pipeline.bench.models import describe, num_patches, token_methods

HELP = "one ViT encoder, one training step per reduction method"
QUICK = "batch 2 and 3 repeats (same model)"
REPEATS = "timed steps per method (default 5; 3 with --quick)"
TARGETS = {
    "elip-reuse": {"flops": 0.75, "activation_bytes": 0.75, "wall_s": 0.82},
    "elip-lookahead": {"activation_bytes": 0.78},
    "flip": {"flops": 0.55},
}


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm ViT name")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--evit-keep-rate", type=float, default=0.7)


def run(args) -> list[dict]:
    from pipeline.models.vit import VisionEncoder, VitConfig

    dev = device()
    batch, repeats = batch_repeats(args)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, args.image_size, args.image_size, generator=gen).to(dev)
    cases = []
    methods = token_methods(num_patches(VitConfig(model_name=args.model, image_size=args.image_size)),
                            evit_keep_rate=args.evit_keep_rate)
    for method, reduction in methods.items():
        torch.manual_seed(0)  # identical weights for every method
        enc = VisionEncoder(VitConfig(model_name=args.model, image_size=args.image_size, reduction=reduction))
        enc = enc.to(dev).train()
        text_cls = torch.randn(batch, enc.embed_dim, generator=gen).to(dev)

        def step(enc=enc, text_cls=text_cls):
            enc.zero_grad(set_to_none=True)
            enc(images, text_cls=text_cls).tokens.float().square().mean().backward()

        with torch.no_grad():  # measured: the adaptive budget's counts follow the batch
            out = enc(images, text_cls=text_cls)
        extra = {"token_layers": sum(out.tokens_per_layer)}
        if out.budgets is not None:
            extra["budget_mean"] = [round(v, 2) for v in out.budgets.float().mean(0).tolist()]
        cases.append(Case(method, step, list(enc.parameters()), extra))
    print(f"[bench] tokens: {args.model} at {args.image_size}px, batch {batch}, one training step "
          f"(forward + backward) per method on {dev}; {describe(methods)}", flush=True)
    rows = run_side_by_side(cases, repeats)
    report(rows, [("method", "method", "{}"), ("token_layers", "token-layers", "{}"),
                  ("token_layers_ratio", "x", "{:.3f}"), *COST_COLUMNS], TARGETS)
    return rows
