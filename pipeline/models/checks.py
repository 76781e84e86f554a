"""Checks of a model config that need no weights and no process group, run when the config is
loaded (``pipeline.config.load_config``): a bad ``reduction.*`` or ``text.prune`` value is then
a one-line error naming the dotted key before any rank starts, not a traceback from inside the
model's constructor on every rank."""
from __future__ import annotations

import dataclasses

import timm
import torch

from pipeline.models.text import TextConfig, check_guidance, check_prune
from pipeline.models.vit import VitConfig
from pipeline.tokens.plan import build_plan


def vit_depth_and_patches(cfg: VitConfig) -> tuple[int, int]:
    """``(layers, patches)`` of the timm ViT ``cfg`` names, built on the meta device (no memory,
    no weights)."""
    with torch.device("meta"):
        vit = timm.create_model(cfg.model_name, pretrained=False, num_classes=0, img_size=cfg.image_size,
                                **cfg.timm_kwargs)
    return len(vit.blocks), vit.patch_embed.num_patches


def check_model_config(cfg, prefix: str = "model") -> None:
    """Raise ValueError, starting with the dotted key, for the first value of the model section
    that the model would refuse while it is built: each ViT's token-reduction plan against its
    depth and patch count, each text encoder's ``prune``, and ELIP with learned text pruning."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}.{f.name}"
        if isinstance(value, VitConfig):
            try:
                depth, patches = vit_depth_and_patches(value)
            except (RuntimeError, TypeError, AttributeError) as err:  # timm: unknown name, bad kwargs
                raise ValueError(f"{key}.model_name={value.model_name!r}: cannot build it with image_size="
                                 f"{value.image_size} and timm_kwargs={value.timm_kwargs}: {err}") from None
            try:
                build_plan(value.reduction, depth, patches)
            except ValueError as err:  # "reduction.<key>...": the key below this section
                raise ValueError(f"{key}.{err}") from None
        elif isinstance(value, TextConfig):
            try:
                check_prune(value.prune, value.text_layers)
            except ValueError as err:  # "text.prune.<key>...": the key below the model section
                raise ValueError(f"{prefix}.{err}") from None
    vision, text = (getattr(cfg, name, None) for name in ("vision", "text"))
    if isinstance(vision, VitConfig) and isinstance(text, TextConfig):
        check_guidance(cfg)  # its message names both keys
