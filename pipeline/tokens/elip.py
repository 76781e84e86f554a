"""ELIP: text-guided vision-token pruning and merging.

Guo et al., "Efficient Language-Image Pre-training with Fewer Vision Tokens". The image
[CLS] is mixed with the text [CLS] (Eq. 1); its attention over the patch tokens ranks them;
the top ``keep`` survive in their original order and the rest are folded into one token
weighted by their renormalised attention (Eq. 3-4).
"""
from __future__ import annotations

import torch

FUSED_EPS = 1e-6  # the official code's epsilon in the fused-token normaliser


def fuse_cls(img_cls: torch.Tensor, text_cls: torch.Tensor | None, lam: float = 0.8) -> torch.Tensor:
    """ELIP Eq. 1: the text-aware [CLS] that guides token selection.

    Args:
        img_cls: ``[B, D]`` image [CLS] token.
        text_cls: ``[B, D]`` text [CLS] token, or ``None`` for vision-only selection (lam = 1).
        lam: weight of the image [CLS] (0.8 in the official code).
    Returns:
        ``[B, D]`` = ``lam * img_cls + (1 - lam) * text_cls``.
    """
    if text_cls is None:
        return img_cls
    if text_cls.shape != img_cls.shape:
        raise ValueError(
            f"fuse_cls: text_cls shape {tuple(text_cls.shape)} != img_cls shape {tuple(img_cls.shape)}; "
            "project the text [CLS] to the vision width first"
        )
    return lam * img_cls + (1.0 - lam) * text_cls.to(img_cls.dtype)


def select_and_fuse(
    x: torch.Tensor, scores: torch.Tensor, keep: int, return_index: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """ELIP Eq. 3-4: keep the ``keep`` most attended tokens, fuse the rest into one.

    Selection and fusion weights are computed from ``scores.detach()``: no gradient reaches
    the scores, while the token values (kept and fused) stay differentiable.

    Args:
        x: ``[B, N, D]`` tokens, [CLS] at index 0.
        scores: ``[B, N-1]`` head-averaged attention of the (text-fused) [CLS] query over
            tokens ``1..N-1``.
        keep: number of non-[CLS] tokens kept.
        return_index: also return the ``[B, keep]`` positions (in ``0..N-2``) of the kept
            tokens among tokens ``1..N-1``, to track which patches survive.
    Returns:
        ``[B, 2+keep, D]``: [CLS], the kept tokens in their original order, then the fused
        token. With ``keep >= N-1`` nothing is dropped and ``x`` is returned unchanged (index
        ``None``).
    """
    B, N, D = x.shape
    if scores.shape != (B, N - 1):
        raise ValueError(f"select_and_fuse: scores shape {tuple(scores.shape)}, expected {(B, N - 1)}")
    if keep < 0:
        raise ValueError(f"select_and_fuse: keep must be >= 0, got {keep}")
    if keep >= N - 1:
        return (x, None) if return_index else x
    scores = scores.detach().float()
    kept_idx = scores.topk(keep, dim=1).indices.sort(dim=1).values  # [B, keep], original order
    dropped = torch.ones_like(scores, dtype=torch.bool).scatter_(1, kept_idx, False)
    weights = scores * dropped
    weights = weights / (weights.sum(dim=1, keepdim=True) + FUSED_EPS)  # [B, N-1], zero on kept

    tokens = x[:, 1:]
    kept = tokens.gather(1, kept_idx.unsqueeze(-1).expand(-1, -1, D))
    fused = torch.einsum("bn,bnd->bd", weights.to(x.dtype), tokens).unsqueeze(1)
    out = torch.cat([x[:, :1], kept, fused], dim=1)
    return (out, kept_idx) if return_index else out
