"""Checks of a model config that need no weights and no process group, run when the config is
loaded (``pipeline.config.load_config``): a bad ``reduction.*`` or ``text.prune`` value is then
a one-line error naming the dotted key before any rank starts, not a traceback from inside the
model's constructor on every rank."""
from __future__ import annotations

import dataclasses

import timm
import torch

from pipeline.models.pairing import check_guidance
from pipeline.models.text import TextConfig, check_prune
from pipeline.models.vit import VitConfig
from pipeline.tokens.plan import build_plan


def vit_depth_and_patches(cfg: VitConfig) -> tuple[int, int]:
    """``(layers, patches)`` of the timm ViT ``cfg`` names, built on the meta device (no memory,
    no weights)."""
    with torch.device("meta"):
        vit = timm.create_model(cfg.model_name, pretrained=False, num_classes=0, img_size=cfg.image_size,
                                **cfg.timm_kwargs)
    return len(vit.blocks), vit.patch_embed.num_patches


def check_model_config(cfg, image_size: int, prefix: str = "model") -> None:
    """Raise ValueError, starting with the dotted key, for the first value of the model section
    that the model would refuse while it is built or at its first step: each ViT's size against
    the images the data section makes (``image_size``), its token-reduction plan against its
    depth and patch count, each text encoder's ``prune``, and ELIP with learned text pruning."""
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    text_guided = False
    for name, value in sections.items():
        key = f"{prefix}.{name}"
        if isinstance(value, VitConfig):
            if value.image_size != image_size:
                raise ValueError(f"data.image_size={image_size} differs from {key}.image_size={value.image_size}: "
                                 "the ViT's patch grid and position embeddings are built for the latter; set both")
            try:
                depth, patches = vit_depth_and_patches(value)
            except (RuntimeError, TypeError, AttributeError) as err:  # timm: unknown name, bad kwargs
                raise ValueError(f"{key}.model_name={value.model_name!r}: cannot build it with image_size="
                                 f"{value.image_size} and timm_kwargs={value.timm_kwargs}: {err}") from None
            try:
                plan = build_plan(value.reduction, depth, patches)
            except ValueError as err:  # "reduction.<key>...": the key below this section
                raise ValueError(f"{key}.{err}") from None
            text_guided = text_guided or (name == "vision" and plan.text_guided)
        elif isinstance(value, TextConfig):
            try:
                check_prune(value.prune, value.text_layers)
            except ValueError as err:  # "text.prune.<key>...": the key below the model section
                raise ValueError(f"{prefix}.{err}") from None
    if isinstance(sections.get("vision"), VitConfig) and isinstance(sections.get("text"), TextConfig):
        check_guidance(cfg, text_guided)  # its message names both keys
