"""The models benchmarks measure: paper-size backbones read from the shipped experiment configs
(``pipeline/configs/*.yaml`` through :func:`pipeline.config.load_config`), with random weights
(FLOPs and memory need none), and the reductions compared on them.

Only what a shipped config cannot say is set here: BERT-base's and OPT-2.7B's sizes stand in
for their weight directories, which benchmarks do not read.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from pipeline.config import load_config

# the shipped config of each backbone benchmarked at paper size
BACKBONE_CONFIGS = {"albef": "albef_elip", "blip": "blip_elip", "meter": "meter_elip"}
EVLGEN_CONFIG = "evlgen_opt2.7b"
# config.json of bert-base-uncased and of facebook/opt-2.7b: the sizes their directories would give
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
OPT_2_7B = dict(model_type="opt", hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                word_embed_proj_dim=2560, max_position_embeddings=2048, vocab_size=50272)
BENCH_QUEUE = 4096  # ITC feature queue: the paper's 57600-65536 only adds memory that is not the method's


def paper_model(backbone: str, reduction=None, image_size: int | None = None):
    """The paper-size model config of ``backbone`` from its shipped config; ``reduction``
    replaces the config's (default: kept), ``image_size`` its resolution."""
    if backbone not in BACKBONE_CONFIGS:
        raise ValueError(f"--backbone {backbone!r}: known backbones are {sorted(BACKBONE_CONFIGS)}")
    model = load_config(BACKBONE_CONFIGS[backbone]).model
    vision = replace(model.vision, checkpoint=None, image_size=image_size or model.vision.image_size,
                     reduction=model.vision.reduction if reduction is None else reduction)
    model = replace(model, vision=vision, text=replace(model.text, pretrained=None, bert=dict(BERT_BASE)))
    if hasattr(model, "queue_size"):
        model = replace(model, queue_size=BENCH_QUEUE)
    return model


def elip_layout(backbone: str) -> tuple[list[int], list[float]]:
    """ELIP's ``(layers, ratios)`` as the backbone's shipped config sets them (or the plan's defaults)."""
    from pipeline.tokens.plan import ELIP_VIT_B16

    reduction = paper_model(backbone).vision.reduction
    return list(reduction.layers or ELIP_VIT_B16[0]), list(reduction.ratios or ELIP_VIT_B16[1])


FLIP_KEEP = 0.5  # FLIP's main setting (50 % of the patches masked)
BUDGET_TAU = 0.8  # adaptive budget: attention mass each image keeps, at most ELIP's ratios


def token_methods(num_patches: int, num_layers: int = 12, evit_keep_rate: float = 0.7, elip_layout=None):
    """The compared reductions. ToMe's constant r is the one whose token-layers come closest to
    ELIP's plan (ViT-B/16 at 224: r=10, 1704 vs 1684); EViT keeps its paper's 0.7 at layers
    3/6/9 (1652); FLIP keeps half the patches at the input; ``adaptive`` is ELIP-reuse with the
    per-image budget (``budget_tau``), bounded by ELIP's ratios. ``elip_layout``: ``(layers,
    ratios)``, default ELIP's ViT-B/16 one."""
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
        "flip": ReductionConfig(method="flip", flip_keep=FLIP_KEEP),
        "adaptive": ReductionConfig(method="elip", elip_mode="reuse", layers=layers, ratios=ratios,
                                    budget_tau=BUDGET_TAU),
    }


def num_patches(vit_cfg) -> int:
    """Patch count of a ViT config, from a parameter-free (meta device) build."""
    from pipeline.models.vit import VisionEncoder
    from pipeline.tokens.plan import ReductionConfig

    with torch.device("meta"):
        return VisionEncoder(replace(vit_cfg, reduction=ReductionConfig(), checkpoint=None)).num_patches


def backbone_methods(backbone: str, image_size: int | None = None, only: list[str] | None = None) -> dict:
    """:func:`token_methods` for ``backbone``'s ViT and ELIP layout; ``only``: the subset to keep
    (an unknown name is an error listing the known ones)."""
    vit = paper_model(backbone, image_size=image_size).vision
    methods = token_methods(num_patches(vit), vit.timm_kwargs.get("depth", 12), elip_layout=elip_layout(backbone))
    if only:
        unknown = sorted(set(only) - set(methods))
        if unknown:
            raise ValueError(f"--methods {unknown}: known methods are {list(methods)}")
        methods = {m: r for m, r in methods.items() if m in only}
    return methods


def describe(methods: dict) -> str:
    """One line saying what the compared reductions are."""
    if not {"tome", "evit", "elip-reuse"} <= set(methods):  # a --methods subset
        return f"methods {list(methods)}"
    elip = methods["elip-reuse"]
    return (f"ToMe r={methods['tome'].r} (closest to ELIP's token-layers), EViT keep {methods['evit'].keep_rate} "
            f"at layers 3/6/9, ELIP {'/'.join(map(str, elip.ratios))} before layers "
            f"{'/'.join(map(str, elip.layers))} guided by the text [CLS]")
