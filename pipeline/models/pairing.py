"""How a fusion backbone's ViT and text encoder are paired (ALBEF, BLIP, METER): equal widths,
which of them runs first, and the guidance each hands the other.

ELIP needs the text [CLS] before the ViT (the encoder says so: ``VisionEncoder.text_guided``);
learned text pruning needs the image [CLS] before the text layers. The two cannot guide each
other in one step, so asking for both is a config error.
"""
from __future__ import annotations

from typing import Callable

import torch

from pipeline.models.vit import VisionEncoder, VisionOutput


def check_guidance(cfg, text_guided: bool) -> bool:
    """Whether the ViT must run before the text encoder (``text.prune.strategy: learned``) under
    ``cfg`` (a backbone config with ``text.prune`` and ``vision.reduction``), given whether its
    reduction plan is ``text_guided``; asking for both kinds of guidance is a ValueError naming
    the keys."""
    learned = cfg.text.prune.strategy == "learned"
    if learned and text_guided:
        raise ValueError(
            "model.text.prune.strategy=learned needs the image [CLS] before the text encoder, while "
            f"model.vision.reduction.method={cfg.vision.reduction.method} needs the text [CLS] before the ViT: "
            "use one of them"
        )
    return learned


def check_pairing(cfg, vision: VisionEncoder, text_width: int, why: str) -> bool:
    """Check that ``vision`` and a text encoder of ``text_width`` can be paired under ``cfg``
    (a backbone config with ``text.prune``); ``why`` names what needs equal widths.

    Returns:
        Whether the ViT must run first (``text.prune.strategy: learned``).
    Raises:
        ValueError naming the keys.
    """
    if text_width != vision.embed_dim:
        raise ValueError(f"model.vision width {vision.embed_dim} != model.text hidden_size {text_width}: {why}")
    return check_guidance(cfg, vision.text_guided)


def encode_pair(
    vision: VisionEncoder,
    encode_text: Callable,
    images: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    image_first: bool,
    **text_kwargs,
):
    """Text and image encoders in the order guidance needs: text first when its [CLS] guides the
    ViT (``vision.text_guided``); the ViT first, unguided, when the image [CLS] guides text
    pruning (``image_first``).

    Args:
        encode_text: ``(ids, mask, image_cls=..., **text_kwargs) -> TextOutput``.
        images: ``[B, 3, H, W]``; ids, mask: ``[B, L]`` tokenized captions.
    Returns:
        ``(TextOutput, VisionOutput)``; the vision output tracks kept patches.
    """
    out: VisionOutput | None = None
    if image_first:
        out = vision(images, track_patches=True)
    text = encode_text(ids, mask, image_cls=out.tokens[:, 0] if out else None, **text_kwargs)
    if out is None:
        out = vision(images, text_cls=text.hidden[:, 0] if vision.text_guided else None, track_patches=True)
    return text, out
