"""Side-by-side benchmarks: every method measured in one process, reported as ratios to ``none``.

    python -m pipeline.bench tokens [--quick] [--json]          one ViT encoder, every reduction
    python -m pipeline.bench step --backbone albef [--quick]    one full pre-training step
    python -m pipeline.bench table [--quick]                    the paper's Table 1: every backbone x reduction
    python -m pipeline.bench data [--json]                      loader throughput vs the training step
    python -m pipeline.bench evlgen [--quick] [--json]          EVLGen connectors: TomeFormer, Q-Former, no merge
    python -m pipeline.bench autobatch [--quick] [--json]       micro-batch each reduction admits in one budget

FLOPs and activation bytes are deterministic and back the claims; wall time is a median over
repeats taken round-robin across methods (so drift hits all of them alike) and is only
meaningful as a ratio. With ``--json`` the last line printed is one JSON object ``{"rows": [...]}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from pipeline.device import pick_device
from pipeline.train.profile import measure_step, median_wall, peak_cuda_bytes, timed_call

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
    print(format_table(_scaled(rows), columns))
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


def token_methods(num_patches: int, num_layers: int = 12, evit_keep_rate: float = 0.7, elip_layout=None):
    """The compared reductions. ToMe's constant r is the one whose token-layers come closest to
    ELIP's plan (ViT-B/16 at 224: r=10, 1704 vs 1684); EViT keeps its paper's 0.7 at layers
    3/6/9 (1652). ``elip_layout``: ``(layers, ratios)``, default ELIP's ViT-B/16 one."""
    from pipeline.tokens.plan import ELIP_VIT_B16, EVIT_DEFAULT_LAYERS, ReductionConfig, build_plan

    layers, ratios = (list(x) for x in (elip_layout or ELIP_VIT_B16))

    def elip(mode):
        return ReductionConfig(method="elip", elip_mode=mode, layers=layers, ratios=ratios)

    def token_layers(cfg):
        return sum(build_plan(cfg, num_layers, num_patches).tokens_per_layer(num_patches))

    target = token_layers(elip("reuse"))
    tome_r = min(range(1, num_patches // 2),
                 key=lambda r: abs(token_layers(ReductionConfig(method="tome", r=r)) - target))
    return {
        "none": ReductionConfig(method="none"),
        "elip-lookahead": elip("lookahead"),
        "elip-reuse": elip("reuse"),
        "tome": ReductionConfig(method="tome", r=tome_r),
        "evit": ReductionConfig(method="evit", keep_rate=evit_keep_rate, layers=list(EVIT_DEFAULT_LAYERS)),
    }


def num_patches(vit_cfg) -> int:
    """Patch count of a ViT config, from a parameter-free (meta device) build."""
    from dataclasses import replace

    from pipeline.models.vit import VisionEncoder
    from pipeline.tokens.plan import ReductionConfig

    with torch.device("meta"):
        return VisionEncoder(replace(vit_cfg, reduction=ReductionConfig(), checkpoint=None)).num_patches


def _describe(methods: dict) -> str:
    if not {"tome", "evit", "elip-reuse"} <= set(methods):  # a --methods subset
        return f"methods {list(methods)}"
    elip = methods["elip-reuse"]
    return (f"ToMe r={methods['tome'].r} (closest to ELIP's token-layers), EViT keep {methods['evit'].keep_rate} "
            f"at layers 3/6/9, ELIP {'/'.join(map(str, elip.ratios))} before layers "
            f"{'/'.join(map(str, elip.layers))} guided by the text [CLS]")


def bench_tokens(args) -> list[dict]:
    from pipeline.models.vit import VisionEncoder, VitConfig

    device = pick_device()
    batch = args.batch or (2 if args.quick else 8)
    repeats = args.repeats or (3 if args.quick else 5)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, args.image_size, args.image_size, generator=gen).to(device)
    cases = []
    methods = token_methods(num_patches(VitConfig(model_name=args.model, image_size=args.image_size)),
                            evit_keep_rate=args.evit_keep_rate)
    for method, reduction in methods.items():
        torch.manual_seed(0)  # identical weights for every method
        enc = VisionEncoder(VitConfig(model_name=args.model, image_size=args.image_size, reduction=reduction))
        enc = enc.to(device).train()
        text_cls = torch.randn(batch, enc.embed_dim, generator=gen).to(device)

        def step(enc=enc, text_cls=text_cls):
            enc.zero_grad(set_to_none=True)
            enc(images, text_cls=text_cls).tokens.float().square().mean().backward()

        lengths = enc.expected_tokens_per_layer()
        cases.append(Case(method, step, list(enc.parameters()), {"token_layers": sum(lengths)}))
    print(f"[bench] tokens: {args.model} at {args.image_size}px, batch {batch}, one training step "
          f"(forward + backward) per method on {device}; {_describe(methods)}", flush=True)
    rows = run_side_by_side(cases, repeats)
    report(rows, [("method", "method", "{}"), ("token_layers", "token-layers", "{}"),
                  ("token_layers_ratio", "x", "{:.3f}"), *COST_COLUMNS], TOKENS_TARGETS)
    return rows


# -- step: one full pre-training step of a backbone, every reduction -------------------------
# The paper's Table 1 (ELIP / base, batch 36): TFLOPs and GPU memory; elip-lookahead is what the
# official code runs, so it must do at least as well; elip-reuse is ours.
PAPER = {
    "albef": {"tflops": (8.50, 9.65), "memory_gb": (69.6, 88.1)},
    "blip": {"tflops": (9.34, 11.03), "memory_gb": (74.7, 90.8)},
    "meter": {"tflops": (6.43, 8.66), "memory_gb": (70.4, 90.0)},
}


def _paper_ratio(backbone: str, key: str) -> float:
    elip, base = PAPER[backbone][key]
    return round(elip / base, 3)


STEP_TARGETS = {
    backbone: {
        "elip-lookahead": {"flops": _paper_ratio(backbone, "tflops"),
                           "activation_bytes": _paper_ratio(backbone, "memory_gb")},
        "elip-reuse": {"flops": 0.80},
    }
    for backbone in PAPER
}
STEP_TARGETS["albef"]["elip-reuse"]["activation_bytes"] = 0.78
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
STEP_CAPTION = "two red circles at the top left and a blue square in the bottom right of the picture"
TABLE_BATCH = 36  # the paper's Table 1 batch: FLOPs are linear in the batch, so they are scaled to it


def elip_layout(backbone: str):
    """ELIP's published ``(layers, ratios)`` for the backbone's ViT."""
    from pipeline.tokens.plan import ELIP_METER_B32, ELIP_VIT_B16

    return ELIP_METER_B32 if backbone == "meter" else ELIP_VIT_B16


def backbone_config(backbone: str, reduction, image_size: int | None = None):
    """The paper-size model config of ``backbone`` (random init: FLOPs and memory need no weights)."""
    from pipeline.models.text import TextConfig
    from pipeline.models.vit import VitConfig

    if backbone == "albef":
        from pipeline.models.albef import AlbefConfig

        vision = VitConfig(image_size=image_size or 256, reduction=reduction)
        return AlbefConfig(vision=vision, text=TextConfig(bert=BERT_BASE), queue_size=4096)
    if backbone == "blip":  # ViT-B/16 at 224, BERT-base as unimodal encoder, grounded encoder and decoder
        from pipeline.models.blip import BlipConfig

        vision = VitConfig(image_size=image_size or 224, reduction=reduction)
        return BlipConfig(vision=vision, text=TextConfig(bert=BERT_BASE, text_layers=12), queue_size=4096)
    if backbone == "meter":  # CLIP ViT-B/32 (11 layers) at 224, BERT-base, 6 co-attention layers per stream
        from pipeline.models.meter import MeterConfig

        vision = VitConfig(model_name="vit_base_patch32_clip_224", image_size=image_size or 224,
                           timm_kwargs={"depth": 11}, reduction=reduction)
        return MeterConfig(vision=vision, text=TextConfig(bert=BERT_BASE, text_layers=12, max_tokens=50))
    raise ValueError(f"--backbone {backbone!r}: known backbones are {sorted(STEP_TARGETS)}")


def backbone_methods(backbone: str, image_size: int | None = None, only: list[str] | None = None) -> dict:
    """:func:`token_methods` for ``backbone``'s ViT and ELIP layout; ``only``: the subset to keep
    (an unknown name is an error listing the known ones)."""
    from pipeline.tokens.plan import ReductionConfig

    vit = backbone_config(backbone, ReductionConfig(), image_size).vision
    methods = token_methods(num_patches(vit), vit.timm_kwargs.get("depth", 12), elip_layout=elip_layout(backbone))
    if only:
        unknown = sorted(set(only) - set(methods))
        if unknown:
            raise ValueError(f"--methods {unknown}: known methods are {list(methods)}")
        methods = {m: r for m, r in methods.items() if m in only}
    return methods


def step_cases(backbone: str, batch: int, device, image_size: int | None = None, only: list[str] | None = None):
    """One :class:`Case` per reduction of ``backbone``: a full pre-training step, all losses.

    Every case's model holds the same parameter and buffer tensors (the reduction changes no
    weight; one paper-size copy in memory instead of five) and frees its gradients after the step.
    Returns ``(cases, methods, image_size)``.
    """
    from pipeline.models import build_model

    methods = backbone_methods(backbone, image_size, only)
    cases, first = [], None
    for method, reduction in methods.items():
        torch.manual_seed(0)
        cfg = backbone_config(backbone, reduction, image_size)
        if first is None:
            model = first = build_model(cfg).to(device)
        else:
            with torch.device("meta"):
                model = build_model(cfg)
            _share_tensors(model, first)
        model.train()
        size = model.visual_encoder.cfg.image_size
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        data = {"image": images, "text": [STEP_CAPTION] * batch, "epoch_progress": 1.0}

        def step(model=model, data=data):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)  # same MLM masks, hard negatives and ITM pairs for every method
            model(data)["loss"].backward()
            model.zero_grad(set_to_none=True)

        tokens = sum(model.visual_encoder.expected_tokens_per_layer())
        cases.append(Case(method, step, list(model.parameters()), {"token_layers": tokens}))
    return cases, methods, size


def _share_tensors(model: torch.nn.Module, source: torch.nn.Module) -> None:
    """Point a meta-device ``model`` at ``source``'s parameters and buffers (same architecture)."""
    model.load_state_dict(source.state_dict(), assign=True)
    buffers = dict(source.named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # non-persistent buffers are not in the state dict (BERT's position_ids)
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = buffers[name]


def _batch_repeats(args) -> tuple[int, int]:
    batch = args.batch or (2 if args.quick else 8)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    return batch, repeats


def bench_step(args) -> list[dict]:
    device = pick_device()
    batch, repeats = _batch_repeats(args)
    only = args.methods.split(",") if args.methods else None
    cases, methods, size = step_cases(args.backbone, batch, device, args.image_size, only)
    described = _describe(methods)
    print(f"[bench] step: {args.backbone} (paper size, random init) at {size}px, batch {batch}, one full "
          f"pre-training step (all losses, forward + backward) per reduction on {device}; {described}",
          flush=True)
    rows = run_side_by_side(cases, repeats)
    report(rows, [("method", "method", "{}"), ("token_layers", "ViT token-layers", "{}"), *COST_COLUMNS],
           STEP_TARGETS[args.backbone])
    return rows


TABLE_COLUMNS = [
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


def bench_table(args) -> list[dict]:
    """The paper's Table 1 for every backbone x reduction, each backbone's methods side by side."""
    device = pick_device()
    batch, repeats = _batch_repeats(args)
    backbones = args.backbones.split(",")
    print(f"[bench] table: one full pre-training step (all losses, forward + backward) per backbone and "
          f"reduction, paper-size models (random init) at batch {batch} on {device}; TFLOPs@36 = measured "
          f"FLOPs x {TABLE_BATCH}/{batch} (FLOPs are linear in the batch); latency, activation bytes saved "
          f"for backward and CUDA peak memory at batch {batch}; every ratio is to 'none' of the same backbone",
          flush=True)
    rows, lines = [], []
    for backbone in backbones:
        if backbone not in STEP_TARGETS:
            raise ValueError(f"--backbones: unknown backbone {backbone!r}; known: {sorted(STEP_TARGETS)}")
        cases, methods, size = step_cases(backbone, batch, device, only=args.methods.split(",") if args.methods else None)
        described = _describe(methods)
        print(f"[bench] {backbone} at {size}px: {described}", flush=True)
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
                     f"= {_paper_ratio(backbone, 'tflops'):.3f}x, {paper['memory_gb'][0]}/{paper['memory_gb'][1]} GB "
                     f"= {_paper_ratio(backbone, 'memory_gb'):.3f}x")
        lines += [f"{backbone:6s} {line}" for line in check_targets(part, STEP_TARGETS[backbone])]
    print(format_table(rows, TABLE_COLUMNS))
    print("\n".join(lines))
    return rows


# -- data: does loading keep up with training? (pipeline/bench_data.py) ----------------------
def bench_data(args) -> list[dict]:
    from pipeline.bench_data import bench_data as run

    return run(args)


# -- evlgen: one EVLGen training step per connector ------------------------------------------
OPT_2_7B = dict(model_type="opt", hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                word_embed_proj_dim=2560, max_position_embeddings=2048, vocab_size=50272)
EVLGEN_SIZES = {
    # the paper's: EVA-CLIP ViT-g/14 at 224 px (257 tokens), BERT-base TomeFormer, OPT-2.7B
    "paper": dict(vision=dict(model_name="eva_giant_patch14_clip_224", image_size=224), bert=BERT_BASE, llm=OPT_2_7B),
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
EVLGEN_CONNECTORS = ("tomeformer-mean", "tomeformer-weighted", "qformer", "none")
EVLGEN_TARGETS = {  # ratios to the connector that merges nothing
    "tomeformer-mean": {"flops": 0.5, "activation_bytes": 0.6},
    "tomeformer-weighted": {"flops": 0.5, "activation_bytes": 0.6},
}


def evlgen_config(size: str, connector: str, dtype: str = "fp32"):
    """An EVLGen config of ``size`` (``EVLGEN_SIZES``) with one of ``EVLGEN_CONNECTORS``; random
    weights (FLOPs and memory need none), BLIP-2's 32 queries for the Q-Former."""
    from pipeline.models.connectors import QFormerConfig, TomeFormerConfig
    from pipeline.models.evlgen import EvlgenConfig, LLMConfig
    from pipeline.models.vit import VitConfig

    spec = EVLGEN_SIZES[size]
    merge, r = {"tomeformer-mean": ("mean", 19), "tomeformer-weighted": ("weighted", 19),
                "none": ("mean", 0)}.get(connector, ("mean", 0))
    return EvlgenConfig(vision=VitConfig(**spec["vision"]),
                        connector="qformer" if connector == "qformer" else "tomeformer",
                        tomeformer=TomeFormerConfig(bert=dict(spec["bert"]), r=r, merge=merge),
                        qformer=QFormerConfig(bert=dict(spec["bert"])),
                        llm=LLMConfig(config=dict(spec["llm"]), dtype=dtype))


def evlgen_flops_split(model, data: dict) -> dict[str, int]:
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


def bench_evlgen(args) -> list[dict]:
    from pipeline.models import build_model

    device = pick_device()
    size = "quick" if args.quick else args.size
    batch = args.batch or 2
    repeats = args.repeats or (1 if size != "paper" else 3)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    cases, splits = [], {}
    for connector in EVLGEN_CONNECTORS:
        torch.manual_seed(0)
        model = build_model(evlgen_config(size, connector, dtype)).to(device).train()
        px = model.vision.cfg.image_size
        images = torch.randn(batch, 3, px, px, generator=torch.Generator().manual_seed(0)).to(device)
        data = {"image": images, "text": [STEP_CAPTION] * batch}
        splits[connector] = evlgen_flops_split(model, data)

        def step(model=model, data=data):
            model.zero_grad(set_to_none=True)
            model(data)["loss"].backward()

        extra = {"connector": connector, "prompt_tokens": model.num_prompt_tokens(),
                 "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                 **splits[connector]}
        cases.append(Case(connector, step, list(model.parameters()), extra))
    print(f"[bench] evlgen ({size}): {EVLGEN_SIZES[size]['vision']['model_name']} at "
          f"{EVLGEN_SIZES[size]['vision']['image_size']}px, batch {batch}, one training step per connector on "
          f"{device} (frozen ViT and LLM, LLM {dtype}); TomeFormer r=19 per layer, Q-Former 32 queries", flush=True)
    rows = run_side_by_side(cases, repeats, warmup=0 if size != "paper" else 1)
    for row in rows:
        parts = sum(row[k] for k in ("flops_vision", "flops_connector", "flops_llm"))
        if parts != row["flops"]:
            print(f"[bench] note: {row['method']}: the phase split adds up to {parts} FLOPs, "
                  f"the step to {row['flops']}")
    shown = _scaled(rows)
    for row in shown:
        for k in ("flops_vision", "flops_connector", "flops_llm"):
            row[k] /= 1e9
        row["trainable_params"] /= 1e6
    print(format_table(shown, [("connector", "connector", "{}"), ("prompt_tokens", "prompt tokens", "{}"),
                               ("flops_vision", "vision GF", "{:.1f}"), ("flops_connector", "connector GF", "{:.1f}"),
                               ("flops_llm", "LLM GF", "{:.1f}"), ("trainable_params", "trainable M", "{:.2f}"),
                               *COST_COLUMNS]))
    print("\n".join(check_targets(rows, EVLGEN_TARGETS)))
    return rows


# -- autobatch: the batch the freed memory buys ----------------------------------------------
AUTOBATCH_TARGET = 1.35  # ELIP admits at least this times the unpruned batch (paper: 1.33-1.5x)


def bench_autobatch(args) -> list[dict]:
    """Under one budget -- the unpruned model's memory at ``--batch`` (the paper's 40) -- the
    micro-batch each reduction admits, found by :mod:`pipeline.train.autobatch` (CUDA peak on GPU,
    saved bytes on CPU). ``--quick`` fits each method's line from probes at batch 2 and 4 and
    reads the answer off it; saved bytes are exactly linear in the batch, so on CPU it matches
    the verified search at a fraction of the cost."""
    from pipeline.train import autobatch as ab
    from pipeline.config import ExperimentConfig
    from pipeline.models import build_model

    device = pick_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    precision = "bf16" if device.type == "cuda" else "fp32"
    batch = args.batch or 40  # the paper's ALBEF batch per GPU
    described = _describe(backbone_methods(args.backbone, args.image_size))
    methods = backbone_methods(args.backbone, args.image_size,
                               [BASELINE, *args.methods.split(",")] if args.methods else None)
    print(f"[bench] autobatch: {args.backbone} (paper size, random init), budget = the unpruned model's memory at "
          f"batch {batch} ({'CUDA peak' if device.type == 'cuda' else 'activation bytes saved for backward'} + "
          f"model states, ZeRO-2 over 8 ranks, {precision}) on {device}; "
          f"{'line from probes at 2 and 4' if args.quick else 'verified by probes'}; {described}", flush=True)
    rows, budget = [], None
    for method, reduction in methods.items():  # none first: it sets the budget
        model_cfg = backbone_config(args.backbone, reduction, args.image_size)
        cfg = ExperimentConfig(model=model_cfg)
        cfg.data.image_size, cfg.data.max_words = model_cfg.vision.image_size, 30
        torch.manual_seed(0)
        model = build_model(model_cfg).to(device, dtype).train()
        states = ab.model_state_bytes(model, precision, zero_stage=2, world_size=8)
        measure = ab.activation_meter(model, cfg, device, dtype)
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
    missed = [f"{r['method']}: admits {r['batch_ratio']:.2f}x the unpruned batch, target >= {AUTOBATCH_TARGET}"
              for r in rows if r["method"].startswith("elip") and r["batch_ratio"] < AUTOBATCH_TARGET]
    print("[bench] targets: " + ("; ".join(missed) if missed else f"met (ELIP >= {AUTOBATCH_TARGET}x)"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    tokens = sub.add_parser("tokens", help="one ViT encoder, one training step per reduction method")
    step = sub.add_parser("step", help="one full pre-training step of a backbone per reduction method")
    for p in (tokens, step):
        p.add_argument("--quick", action="store_true", help="batch 2 and 3 repeats (same model)")
        p.add_argument("--json", action="store_true", help="end with one JSON line {'rows': [...]}")
        p.add_argument("--batch", type=int, default=None)
        p.add_argument("--repeats", type=int, default=None)
    tokens.add_argument("--model", default="vit_base_patch16_224", help="timm ViT name")
    tokens.add_argument("--image-size", type=int, default=224)
    tokens.add_argument("--evit-keep-rate", type=float, default=0.7)
    step.add_argument("--backbone", default="albef", choices=sorted(STEP_TARGETS))
    step.add_argument("--image-size", type=int, default=None, help="default: the backbone's pre-training size")
    step.add_argument("--methods", default=None, help="comma-separated subset of the reductions (default: all)")
    table = sub.add_parser("table", help="the paper's Table 1: every backbone x reduction, ratios to none")
    table.add_argument("--quick", action="store_true", help="batch 2 and 3 repeats (same models)")
    table.add_argument("--json", action="store_true", help="end with one JSON line {'rows': [...]}")
    table.add_argument("--batch", type=int, default=None)
    table.add_argument("--repeats", type=int, default=None, help="timed steps per method; 0 = FLOPs and bytes only")
    table.add_argument("--backbones", default=",".join(PAPER), help="comma-separated (default: all)")
    table.add_argument("--methods", default=None, help="comma-separated subset of the reductions (default: all)")
    from pipeline.bench_data import add_arguments as data_arguments

    data_arguments(sub.add_parser("data", help="loader samples/s vs open_clip's and next to the training step's"))
    evl = sub.add_parser("evlgen", help="one EVLGen training step per connector (TomeFormer, Q-Former, no merge)")
    evl.add_argument("--quick", action="store_true", help="CPU size (same token counts): --size quick")
    evl.add_argument("--size", choices=sorted(EVLGEN_SIZES), default="paper")
    evl.add_argument("--json", action="store_true", help="end with one JSON line {'rows': [...]}")
    evl.add_argument("--batch", type=int, default=None)
    evl.add_argument("--repeats", type=int, default=None)
    auto = sub.add_parser("autobatch", help="micro-batch each reduction admits in the unpruned model's memory")
    auto.add_argument("--quick", action="store_true", help="read each answer off a line fitted at batch 2 and 4")
    auto.add_argument("--json", action="store_true", help="end with one JSON line {'rows': [...]}")
    auto.add_argument("--batch", type=int, default=None, help="the unpruned model's batch that sets the budget (40)")
    auto.add_argument("--backbone", default="albef", choices=sorted(STEP_TARGETS))
    auto.add_argument("--image-size", type=int, default=None, help="default: the backbone's pre-training size")
    auto.add_argument("--methods", default=None, help="comma-separated subset (none is always measured)")
    args = parser.parse_args(argv)

    rows = {"tokens": bench_tokens, "step": bench_step, "table": bench_table, "data": bench_data,
            "evlgen": bench_evlgen, "autobatch": bench_autobatch}[args.bench](args)
    if args.json:
        print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
