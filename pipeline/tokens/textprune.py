"""Text-token pruning, the ablation of ELIP's Table 4: what if the text lost tokens instead?

Before one text layer (by default the first of the second half), ``ratio`` of the tokens after
[CLS] are dropped; [CLS] always stays. Which ones go is the strategy:

- ``random``: a uniformly random subset;
- ``post``: the trailing ones (the caption cut to its head, as a shorter ``max_tokens`` would);
- ``learned``: the least attended by the image [CLS], used as one extra query row of the
  pruned layer's self-attention (the mirror image of ELIP's text-guided vision pruning).

Padding is always dropped first, so a padded caption loses real words only when it has more
than the kept number. Pure tensor code; the text encoders call it.
"""
from __future__ import annotations

import torch

STRATEGIES = ("none", "random", "post", "learned")


def num_kept(length: int, ratio: float) -> int:
    """Non-[CLS] tokens kept out of ``length - 1`` when ``ratio`` of them are pruned."""
    n = length - 1
    return n - int(ratio * n)


def prune_scores(
    strategy: str,
    mask: torch.Tensor,
    attention: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """How much each non-[CLS] token deserves to stay (higher stays).

    Args:
        strategy: ``random | post | learned``.
        mask: ``[B, L]`` 1 for real tokens, 0 for padding.
        attention: ``[B, L-1]`` image-[CLS] attention over tokens ``1..L-1`` (``learned`` only).
    Returns:
        ``[B, L-1]`` float scores, ``-inf`` on padding.
    """
    B, L = mask.shape
    if strategy == "random":
        scores = torch.rand(B, L - 1, generator=generator).to(mask.device)
    elif strategy == "post":
        scores = -torch.arange(L - 1, device=mask.device, dtype=torch.float32).expand(B, -1)
    elif strategy == "learned":
        if attention is None or attention.shape != (B, L - 1):
            got = None if attention is None else tuple(attention.shape)
            raise ValueError(f"text pruning 'learned' needs [B, L-1] = {(B, L - 1)} image-[CLS] attention, got {got}")
        scores = attention.detach().float()
    else:
        raise ValueError(f"text.prune.strategy={strategy!r}; expected one of {STRATEGIES}")
    return scores.masked_fill(~mask[:, 1:].bool(), float("-inf"))


def select(
    hidden: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep [CLS] and the ``keep`` best-scored tokens, in their original order.

    Args:
        hidden: ``[B, L, D]``; mask: ``[B, L]``; scores: ``[B, L-1]`` for tokens ``1..L-1``.
    Returns:
        ``(hidden [B, 1+keep, D], mask [B, 1+keep], index [B, 1+keep])``; ``index`` holds the
        kept positions in ``0..L-1`` ([CLS] = 0 first), for gathering labels or a second
        encoder's tokens the same way (:func:`gather`).
    """
    B, L, _ = hidden.shape
    if scores.shape != (B, L - 1):
        raise ValueError(f"text pruning: scores shape {tuple(scores.shape)}, expected {(B, L - 1)}")
    if not 0 <= keep <= L - 1:
        raise ValueError(f"text pruning: keep={keep} outside 0..{L - 1}")
    kept = scores.topk(keep, dim=1).indices.sort(dim=1).values + 1
    index = torch.cat([torch.zeros(B, 1, dtype=kept.dtype, device=kept.device), kept], dim=1)
    hidden, mask = gather(hidden, mask, index)
    return hidden, mask, index


def gather(hidden: torch.Tensor, mask: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a kept ``index [B, K]`` (from :func:`select`) to ``hidden [B, L, D]`` and ``mask [B, L]``."""
    hidden = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return hidden, mask.gather(1, index)
