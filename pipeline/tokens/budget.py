"""Adaptive per-image budget: keep, per image, the fewest tokens whose (text-fused) [CLS]
attention mass reaches ``tau``, bounded by a minimum and a maximum count.

Batched by *padding plus key masking*: image ``b`` keeps its own ``counts[b]`` tokens and its own
fused token; the batch's tensor is as long as its largest budget, the shorter images padded with
zero tokens that every later layer masks out of attention (a boolean key mask on the fused
attention, :func:`~torch.nn.functional.scaled_dot_product_attention`). So each image computes
exactly what it would alone at its budget; the padding still costs the batch's largest count in
FLOPs (dense kernels compute the padded rows), which ``pipeline.bench tokens`` (row ``adaptive``)
measures. Past the ViT the padding stays as exact zero rows: :func:`real_tokens` finds them, so
the fusion layers (cross-attention over the image tokens) mask them too without a second tensor
travelling beside the tokens through every caller (ITM's gathers, retrieval's concatenation).
"""
from __future__ import annotations

import torch

from pipeline.tokens.elip import FUSED_EPS


def mass_counts(scores: torch.Tensor, tau: float, min_keep: int, max_keep: int) -> torch.Tensor:
    """Per image, the fewest tokens whose share of the attention mass reaches ``tau``.

    Args:
        scores: ``[B, P]`` non-negative [CLS]-query attention over the P tokens after [CLS]
            (normalised here over those P: [CLS]'s attention to itself is not theirs to share;
            padded tokens carry 0 and so never count).
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


def select_and_fuse_padded(
    x: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ELIP's selection and fusion (Eq. 3-4) with each image's own count, padded to the largest.

    Image ``b``'s row is what :func:`pipeline.tokens.elip.select_and_fuse` gives that image alone
    with ``keep = counts[b]``: [CLS], its ``counts[b]`` most attended real tokens in their
    original order, its fused token (its other real tokens weighted by their renormalised
    scores; none when nothing is left to fuse), then zero padding. Selection and weights use
    ``scores.detach()``; the token values stay differentiable.

    Args:
        x: ``[B, N, D]`` tokens, [CLS] first; scores: ``[B, N-1]`` (text-fused) [CLS] attention
            over tokens ``1..N-1`` (padding's values are ignored).
        counts: ``[B]`` long, tokens each image keeps, at most its real tokens after [CLS].
        valid: ``[B, N]`` bool, the real (not padding) tokens of ``x``; None = all real.
    Returns:
        ``(out [B, 2+K, D], kept [B, K], out_valid [B, 2+K])`` with ``K = counts.max()``:
        ``kept`` holds the kept positions among tokens ``1..N-1``, -1 in the slots past
        ``counts[b]``; ``out_valid`` marks each row's real tokens.
    """
    B, N, D = x.shape
    P = N - 1
    if scores.shape != (B, P) or counts.shape != (B,):
        raise ValueError(f"select_and_fuse_padded: scores {tuple(scores.shape)} / counts {tuple(counts.shape)}, "
                         f"expected {(B, P)} / {(B,)}")
    real = torch.ones(B, P, dtype=torch.bool, device=x.device) if valid is None else valid[:, 1:]
    s = scores.detach().float().masked_fill(~real, -1.0)  # padding ranks after every real token
    pos = torch.arange(P, device=x.device)
    rank = torch.empty_like(pos).expand(B, P).clone()
    rank.scatter_(1, s.argsort(dim=1, descending=True, stable=True), pos.expand(B, P))
    keep = (rank < counts[:, None]) & real
    K = int(counts.max())
    # kept tokens first, in their original order
    kept = ((~keep).long() * P + pos).argsort(dim=1)[:, :K]
    slot = torch.arange(K, device=x.device)[None] < counts[:, None]  # [B, K] filled slots
    tokens = x[:, 1:]
    gathered = tokens.gather(1, kept.unsqueeze(-1).expand(-1, -1, D)) * slot.unsqueeze(-1).to(x.dtype)

    dropped = real & ~keep
    weights = s.clamp_min(0.0) * dropped
    weights = weights / (weights.sum(dim=1, keepdim=True) + FUSED_EPS)
    fused = torch.einsum("bn,bnd->bd", weights.to(x.dtype), tokens)
    has_fused = dropped.any(dim=1)
    # the fused token goes right after each image's own kept tokens (slot counts[b], zero so far)
    at = torch.nn.functional.one_hot(counts + 1, K + 2).to(x.dtype) * has_fused[:, None].to(x.dtype)
    out = torch.cat([x[:, :1], gathered, x.new_zeros(B, 1, D)], dim=1) + at.unsqueeze(-1) * fused.unsqueeze(1)
    out_valid = torch.arange(K + 2, device=x.device)[None] < (counts + 1 + has_fused.long())[:, None]
    return out, kept.masked_fill(~slot, -1), out_valid


def real_tokens(tokens: torch.Tensor) -> torch.Tensor | None:
    """Which tokens of a padded batch are real: padding is an exact zero row (a LayerNorm's
    output never is one).

    Args:
        tokens: ``[B, N, D]``.
    Returns:
        ``[B, N]`` bool, or None when every token is real (no mask needed).
    """
    real = tokens.detach().ne(0).any(dim=-1)
    return None if bool(real.all()) else real
