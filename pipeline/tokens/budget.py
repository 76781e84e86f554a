"""Adaptive per-image budget: keep, per image, the fewest tokens whose (text-fused) [CLS]
attention mass reaches ``tau``, bounded by a minimum and a maximum count.

Batched as *the batch's largest count*, not padding plus key masking: every image of the batch
keeps the batch's largest per-image count ``K`` (its top-``K`` tokens; the rest fused, as ELIP),
so the tokens stay one dense ``[B, 2+K, D]`` tensor. Padding would need a key mask in every
consumer of the ViT's tokens (ALBEF/BLIP/METER cross-attention, ITM's hard-negative gathers, the
teacher), and a masked SDPA call leaves the flash kernel; with the largest count nothing
downstream changes and the cost is the batch's hardest image (``pipeline.bench tokens``, row
``adaptive``). The per-image counts are still returned, for the mean and spread that are logged.
"""
from __future__ import annotations

import torch


def mass_counts(scores: torch.Tensor, tau: float, min_keep: int, max_keep: int) -> torch.Tensor:
    """Per image, the fewest tokens whose share of the attention mass reaches ``tau``.

    Args:
        scores: ``[B, P]`` non-negative [CLS]-query attention over the P tokens after [CLS]
            (normalised here over those P: [CLS]'s attention to itself is not theirs to share).
        tau: mass fraction in ``(0, 1]``; min_keep <= max_keep: bounds on the count, in ``[0, P]``.
    Returns:
        ``[B]`` long counts in ``[min_keep, max_keep]``.
    """
    mass = scores.detach().float()
    mass = mass / mass.sum(dim=1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
    cum = mass.sort(dim=1, descending=True).values.cumsum(dim=1)
    # the first position whose cumulative mass reaches tau (rounding: never past P)
    counts = (cum < tau - 1e-6).sum(dim=1) + 1
    return counts.clamp(min=min_keep, max=max_keep).clamp(max=scores.shape[1])
