"""``evlgen``: one EVLGen training step per connector (TomeFormer mean / weighted, Q-Former, no merge)."""
from __future__ import annotations

from dataclasses import replace

import torch

from pipeline.bench.harness import (
    COST_COLUMNS,
    STEP_CAPTION,
    Case,
    check_targets,
    device,
    format_table,
    run_side_by_side,
    scaled,
)
from pipeline.bench.models import BERT_BASE, EVLGEN_CONFIG, OPT_2_7B

HELP = "one EVLGen training step per connector (TomeFormer, Q-Former, no merge)"
QUICK = "CPU size (same token counts): --size quick"
REPEATS = "timed steps per connector (default 1; 3 at paper size)"
# Sizes other than the shipped config's: each replaces the ViT, the connector's BERT and the LLM.
SIZES = {
    "paper": {},  # evlgen_opt2.7b.yaml: EVA-CLIP ViT-g/14 at 224 px (257 tokens), BERT-base, OPT-2.7B
    # CPU-sized, same token counts (257 -> 29 over 12 connector layers): ViT-S/16 at 256 px,
    # a 12-layer BERT of width 384, a 6-layer OPT of width 512 with OPT's vocabulary
    "quick": dict(vision=dict(model_name="vit_small_patch16_224", image_size=256),
                  bert=dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
                  llm=dict(OPT_2_7B, hidden_size=512, num_hidden_layers=6, ffn_dim=2048, num_attention_heads=8,
                           word_embed_proj_dim=512)),
    # test-sized: 64 px with 4 px patches still gives 257 tokens
    "tiny": dict(vision=dict(model_name="vit_base_patch16_224", image_size=64,
                             timm_kwargs=dict(depth=2, embed_dim=32, num_heads=2, patch_size=4)),
                 bert=dict(hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=64),
                 llm=dict(model_type="opt", hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                          word_embed_proj_dim=32, max_position_embeddings=512)),
}
CONNECTORS = ("tomeformer-mean", "tomeformer-weighted", "qformer", "none")
TARGETS = {  # ratios to the connector that merges nothing
    "tomeformer-mean": {"flops": 0.5, "activation_bytes": 0.6},
    "tomeformer-weighted": {"flops": 0.5, "activation_bytes": 0.6},
}


def add_arguments(parser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="paper")


def evlgen_config(size: str, connector: str, dtype: str = "fp32"):
    """The shipped EVLGen config at ``size`` (:data:`SIZES`) with one of :data:`CONNECTORS`;
    random weights (FLOPs and memory need none), the config's 32 queries for the Q-Former."""
    from pipeline.config import load_config

    model = load_config(EVLGEN_CONFIG).model
    spec = SIZES[size]
    bert = dict(spec.get("bert", BERT_BASE))
    vision = replace(model.vision, checkpoint=None)
    if "vision" in spec:
        vision = replace(vision, **{"timm_kwargs": {}, **spec["vision"]})
    r = model.tomeformer.r  # the paper's 19 per layer: 257 -> 29 tokens
    merge, r = {"tomeformer-mean": ("mean", r), "tomeformer-weighted": ("weighted", r)}.get(connector, ("mean", 0))
    return replace(
        model, vision=vision,
        connector="qformer" if connector == "qformer" else "tomeformer",
        tomeformer=replace(model.tomeformer, pretrained=None, bert=bert, r=r, merge=merge),
        qformer=replace(model.qformer, pretrained=None, bert=dict(bert)),
        llm=replace(model.llm, pretrained=None, config=dict(spec.get("llm", OPT_2_7B)), dtype=dtype),
    )


def flops_split(model, data: dict) -> dict[str, int]:
    """FLOPs of one training step in three parts, counted phase by phase: the frozen ViT
    (forward), the connector + LLM projection (forward and backward) and the frozen LLM
    (forward and backward to its inputs). The parts add up to the whole step's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn):
        with FlopCounterMode(display=False) as counter:
            out = fn()
        return out, int(counter.get_total_flops())

    model.zero_grad(set_to_none=True)
    vision_tokens, vision = count(lambda: model.vision(data["image"]))
    (prompts, _), connector = count(lambda: model.soft_prompts_from_tokens(vision_tokens))
    leaf = prompts.detach().requires_grad_()

    def llm_step():
        inputs, mask, labels = model.lm_inputs(leaf, data["text"])
        model.llm(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss.backward()

    _, llm = count(llm_step)
    _, connector_bwd = count(lambda: prompts.backward(leaf.grad))
    return {"flops_vision": vision, "flops_connector": connector + connector_bwd, "flops_llm": llm}


def run(args) -> list[dict]:
    from pipeline.models import build_model

    dev = device()
    size = "quick" if args.quick else args.size
    batch = args.batch or 2
    repeats = args.repeats or (1 if size != "paper" else 3)
    dtype = "bf16" if dev.type == "cuda" else "fp32"
    cases, splits = [], {}
    for connector in CONNECTORS:
        torch.manual_seed(0)
        cfg = evlgen_config(size, connector, dtype)
        model = build_model(cfg).to(dev).train()
        px = model.vision.cfg.image_size
        images = torch.randn(batch, 3, px, px, generator=torch.Generator().manual_seed(0)).to(dev)
        data = {"image": images, "text": [STEP_CAPTION] * batch}
        splits[connector] = flops_split(model, data)

        def step(model=model, data=data):
            model.zero_grad(set_to_none=True)
            model(data)["loss"].backward()

        extra = {"connector": connector, "prompt_tokens": model.num_prompt_tokens(),
                 "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                 **splits[connector]}
        cases.append(Case(connector, step, list(model.parameters()), extra))
    merged = evlgen_config(size, CONNECTORS[0], dtype)
    print(f"[bench] evlgen ({size}): {merged.vision.model_name} at {merged.vision.image_size}px, batch {batch}, one "
          f"training step per connector on {dev} (frozen ViT and LLM, LLM {dtype}); TomeFormer "
          f"r={merged.tomeformer.r} per layer, Q-Former {merged.qformer.num_queries} queries", flush=True)
    rows = run_side_by_side(cases, repeats, warmup=0 if size != "paper" else 1)
    for row in rows:
        parts = sum(row[k] for k in ("flops_vision", "flops_connector", "flops_llm"))
        if parts != row["flops"]:
            print(f"[bench] note: {row['method']}: the phase split adds up to {parts} FLOPs, "
                  f"the step to {row['flops']}")
    shown = scaled(rows)
    for row in shown:
        for k in ("flops_vision", "flops_connector", "flops_llm"):
            row[k] /= 1e9
        row["trainable_params"] /= 1e6
    print(format_table(shown, [("connector", "connector", "{}"), ("prompt_tokens", "prompt tokens", "{}"),
                               ("flops_vision", "vision GF", "{:.1f}"), ("flops_connector", "connector GF", "{:.1f}"),
                               ("flops_llm", "LLM GF", "{:.1f}"), ("trainable_params", "trainable M", "{:.2f}"),
                               *COST_COLUMNS]))
    print("\n".join(check_targets(rows, TARGETS)))
    return rows
