"""ToMe: token merging by bipartite soft matching.

Bolya et al., "Token Merging: Your ViT But Faster". Tokens are split alternately into sets
A and B; each A token is matched to its most similar B token (cosine similarity of the
attention keys), and the ``r`` most similar pairs are merged. Sizes record how many patches a
token stands for, so merges are size-weighted averages and attention can be proportional
(``+log(size)`` on the keys). Same algorithm and API as the reference implementation.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

MergeFn = Callable[..., torch.Tensor]


def _identity(x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    return x


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, class_token: bool = True, distill_token: bool = False
) -> tuple[MergeFn, MergeFn]:
    """Plan the merge of ``r`` tokens.

    Args:
        metric: ``[B, N, C]`` similarity features (ToMe: keys averaged over heads).
        r: tokens to remove; capped at ``(N - protected) // 2`` (at most half of the set).
        class_token: token 0 is a [CLS]: never merged, kept first.
        distill_token: token 1 is a distillation token: never merged (DeiT).
    Returns:
        ``(merge, unmerge)``: ``merge(x [B, N, D], mode="mean") -> [B, N-r, D]`` (``mode`` is a
        ``scatter_reduce`` reduction: "mean", "sum", "amax"...) and
        ``unmerge(x [B, N-r, D]) -> [B, N, D]`` copying each merged token back to its sources.
    """
    protected = int(class_token) + int(distill_token)
    n_tokens = metric.shape[1]
    r = min(r, (n_tokens - protected) // 2)
    if r <= 0:
        return _identity, _identity

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)  # [B, Na, Nb]
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)  # best B partner of every A token
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]  # A tokens that stay
        src_idx = edge_idx[..., :r, :]  # A tokens merged away
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1).values  # puts the [CLS] (A index 0) first again

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        unm_len = unm_idx.shape[1]
        unm, dst = x[..., :unm_len, :], x[..., unm_len:, :]
        n, _, c = unm.shape
        src = dst.gather(dim=-2, index=dst_idx.expand(n, r, c))
        out = torch.zeros(n, metric.shape[1], c, device=x.device, dtype=x.dtype)
        out[..., 1::2, :] = dst
        out.scatter_(dim=-2, index=(2 * unm_idx).expand(n, unm_len, c), src=unm)
        out.scatter_(dim=-2, index=(2 * src_idx).expand(n, r, c), src=src)
        return out

    return merge, unmerge


def merge_wavg(
    merge: MergeFn, x: torch.Tensor, size: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge.

    Args:
        merge: from :func:`bipartite_soft_matching`.
        x: ``[B, N, D]`` tokens.
        size: ``[B, N, 1]`` patches per token (``None``: all ones).
    Returns:
        ``(x [B, N-r, D], size [B, N-r, 1])``; ``sum(size)`` and ``sum(size * x)`` are conserved.
    """
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_mean(merge: MergeFn, x: torch.Tensor, size: torch.Tensor | None = None):
    """Plain-average merge (what EVLGen's official code does); sizes are still tracked.

    Args/returns as :func:`merge_wavg`.
    """
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    return merge(x, mode="mean"), merge(size, mode="sum")


def proportional_attention_bias(size: torch.Tensor | None) -> torch.Tensor | None:
    """Additive attention bias ``log(size)`` on the keys (ToMe's proportional attention).

    Args:
        size: ``[B, N, 1]`` patches per token, or ``None``.
    Returns:
        ``[B, 1, 1, N]`` float bias broadcastable over heads and queries, or ``None``.
    """
    if size is None:
        return None
    return size.log()[:, None, None, :, 0]


def r_schedule(num_layers: int, r: int | list[int], inflect: float = 0.0) -> list[int]:
    """Tokens to merge in each layer (ToMe's ``parse_r``).

    Args:
        num_layers: depth of the encoder.
        r: a constant ``int`` shaped by ``inflect``, or an explicit per-layer list
            (shorter lists are padded with zeros).
        inflect: 0 = constant; < 0 = decreasing (merge more early: -0.5 goes from 1.5r down
            to 0.5r); > 0 = increasing. The total stays about ``r * num_layers``.
    Returns:
        ``num_layers`` non-negative ints.
    """
    if isinstance(r, (list, tuple)):
        values = [int(v) for v in r]
        if len(values) > num_layers or any(v < 0 for v in values):
            raise ValueError(f"tome r schedule {values}: need at most {num_layers} entries, each >= 0")
        return values + [0] * (num_layers - len(values))
    if r < 0:
        raise ValueError(f"tome r must be >= 0, got {r}")
    if num_layers == 1:
        return [int(r)]
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [max(0, int(min_val + step * i)) for i in range(num_layers)]
