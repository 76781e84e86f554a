"""EViT: keep the attentive tokens, fuse the inattentive ones.

Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations". Unlike ELIP the fused token is weighted by the raw (un-normalised) [CLS]
attention, and the weights keep their gradient, as in the reference code.
"""
from __future__ import annotations

import math

import torch


def num_kept(num_tokens: int, keep_rate: float) -> int:
    """Non-[CLS] tokens EViT keeps out of ``num_tokens`` (= N, [CLS] included)."""
    return math.ceil(keep_rate * (num_tokens - 1))


def select_and_fuse(
    x: torch.Tensor, cls_attn: torch.Tensor, keep_rate: float, return_index: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """Keep ``ceil(keep_rate * (N-1))`` tokens by [CLS] attention and fuse the rest.

    Args:
        x: ``[B, N, D]`` tokens, [CLS] at index 0.
        cls_attn: ``[B, N-1]`` head-averaged [CLS] attention over tokens ``1..N-1``.
        keep_rate: fraction of non-[CLS] tokens kept, in ``(0, 1]``.
        return_index: also return the ``[B, keep]`` positions of the kept tokens.
    Returns:
        ``[B, 2+keep, D]``: [CLS], the kept tokens (most attended first, as in EViT), then
        ``sum_j a_j x_j`` over the dropped tokens. With nothing to drop, ``x`` unchanged.
    """
    B, N, D = x.shape
    if cls_attn.shape != (B, N - 1):
        raise ValueError(f"evit.select_and_fuse: cls_attn shape {tuple(cls_attn.shape)}, expected {(B, N - 1)}")
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"evit keep_rate must be in (0, 1], got {keep_rate}")
    keep = num_kept(N, keep_rate)
    if keep >= N - 1:
        return (x, None) if return_index else x
    order = cls_attn.argsort(dim=1, descending=True)
    kept_idx, dropped_idx = order[:, :keep], order[:, keep:]
    tokens = x[:, 1:]
    kept = tokens.gather(1, kept_idx.unsqueeze(-1).expand(-1, -1, D))
    dropped = tokens.gather(1, dropped_idx.unsqueeze(-1).expand(-1, -1, D))
    weights = cls_attn.gather(1, dropped_idx).to(x.dtype)
    fused = (dropped * weights.unsqueeze(-1)).sum(dim=1, keepdim=True)
    out = torch.cat([x[:, :1], kept, fused], dim=1)
    return (out, kept_idx) if return_index else out
