"""One reduction step of one layer, as an object the encoder calls without knowing the method.

A :class:`~pipeline.tokens.plan.ReductionPlan` holds one step before each layer and one after
each layer's attention; where a method does nothing the step is :data:`IDENTITY` (timm's
``nn.Identity``, ToMe's ``do_nothing``). Every step takes the same inputs, so a new method is a
new step class here and a branch in :func:`~pipeline.tokens.plan.build_plan`, nothing else.

Shapes: ``x [B, N, D]`` tokens, [CLS] first; ``scores [B, N-1]`` head-averaged [CLS]-query
attention over the tokens after [CLS]; ``keys [B, H, N, d]`` the layer's attention keys;
``size [B, N, 1]`` tokens merged into each (ToMe) or None; ``valid [B, N]`` bool, the real
tokens of a padded batch (adaptive budget) or None.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from pipeline.tokens import budget, elip, evit, flip, tome


class Reduced(NamedTuple):
    """A step's output. ``kept``: ``[B, K]`` positions (among the tokens after [CLS]) that survive
    as themselves (-1: a slot of padding or of the fused token), one fused token appended after
    them when ``fused``; None when nothing was dropped. ``counts``: ``[B]`` each image's own
    budget (adaptive budget), else None. ``valid``: ``[B, N_out]`` bool, the real tokens when the
    output is padded, else None."""

    x: torch.Tensor
    size: torch.Tensor | None
    kept: torch.Tensor | None
    fused: bool = True
    counts: torch.Tensor | None = None
    valid: torch.Tensor | None = None


@dataclass(frozen=True)
class Reducer:
    """A reduction step; this base does nothing (:data:`IDENTITY`), subclasses reduce."""

    needs_scores = False  # wants the [CLS]-query attention of its input tokens
    text_guided = False  # that query is the text-fused [CLS] (ELIP), not the layer's own
    merges = False  # output tokens stand for several inputs: no single source patch
    train_only = False  # acts in training mode only (the encoder skips it in eval)
    pads = False  # takes and returns padded batches (``valid``): the adaptive budget

    def acts(self, n: int) -> bool:
        """Whether the step changes a sequence of ``n`` tokens ([CLS] included)."""
        return False

    def tokens_after(self, n: int) -> int:
        """Sequence length out of this step for ``n`` tokens in, [CLS] included."""
        return n

    def __call__(self, x, scores=None, keys=None, size=None) -> Reduced:
        return Reduced(x, size, None)


IDENTITY = Reducer()


@dataclass(frozen=True)
class ElipSelect(Reducer):
    """ELIP before a layer: keep the ``keep`` patches the text-fused [CLS] attends to most, fuse
    the rest into one token (Eq. 3-4)."""

    keep: int
    needs_scores = True
    text_guided = True

    def acts(self, n: int) -> bool:
        return self.keep < n - 1

    def tokens_after(self, n: int) -> int:
        return self.keep + 2 if self.acts(n) else n

    def __call__(self, x, scores=None, keys=None, size=None) -> Reduced:
        x, kept = elip.select_and_fuse(x, scores, self.keep, return_index=True)
        return Reduced(x, size, kept)


@dataclass(frozen=True)
class ElipBudget(Reducer):
    """ELIP with an adaptive per-image budget: each image keeps the fewest of its patches whose
    text-fused [CLS] attention mass reaches ``tau`` (between ``min_keep`` and ``keep``) and fuses
    its others; the batch is padded to its largest count, the padding masked out of every later
    attention (see :mod:`pipeline.tokens.budget`)."""

    keep: int
    tau: float
    min_keep: int
    needs_scores = True
    text_guided = True
    pads = True

    def acts(self, n: int) -> bool:
        return self.min_keep < n - 1

    def tokens_after(self, n: int) -> int:
        """At most: the bound ``keep`` (the count actually kept follows each image)."""
        return min(self.keep, n - 1) + 2 if self.acts(n) else n

    def __call__(self, x, scores=None, keys=None, size=None, valid=None) -> Reduced:
        P = x.shape[1] - 1
        counts = budget.mass_counts(scores if valid is None else scores * valid[:, 1:], self.tau, self.min_keep,
                                    min(self.keep, P))
        if valid is not None:  # never more than an image's own real tokens
            counts = torch.minimum(counts, valid[:, 1:].sum(dim=1))
        x, kept, valid = budget.select_and_fuse_padded(x, scores, counts, valid)
        return Reduced(x, size, kept, counts=counts, valid=valid)


@dataclass(frozen=True)
class EvitFuse(Reducer):
    """EViT after a layer's attention: keep ``ceil(rate * (N-1))`` tokens by the layer's own
    [CLS] attention, fuse the rest with their raw weights (the gradient flows through them)."""

    rate: float
    needs_scores = True

    def acts(self, n: int) -> bool:
        return evit.num_kept(n, self.rate) < n - 1

    def tokens_after(self, n: int) -> int:
        return evit.num_kept(n, self.rate) + 2 if self.acts(n) else n

    def __call__(self, x, scores=None, keys=None, size=None) -> Reduced:
        x, kept = evit.select_and_fuse(x, scores.to(x.dtype), self.rate, return_index=True)
        return Reduced(x, size, kept)


@dataclass(frozen=True)
class TomeMerge(Reducer):
    """ToMe after a layer's attention: merge ``r`` tokens by bipartite soft matching of the
    head-averaged keys, size-weighted."""

    r: int
    merges = True

    def acts(self, n: int) -> bool:
        return self.tokens_after(n) < n

    def tokens_after(self, n: int) -> int:
        return n - min(self.r, (n - 1) // 2)

    def __call__(self, x, scores=None, keys=None, size=None) -> Reduced:
        merge, _ = tome.bipartite_soft_matching(keys.mean(dim=1), self.r, class_token=True)
        x, size = tome.merge_wavg(merge, x, size)
        return Reduced(x, size, None)


@dataclass(frozen=True)
class PatchDrop(Reducer):
    """FLIP at the ViT input: keep ``keep`` patches drawn uniformly at random per sample (torch's
    global RNG), [CLS] kept, the rest dropped without a fused token; in training only unless
    ``train_only`` is False."""

    keep: int
    train_only: bool = True

    def acts(self, n: int) -> bool:
        return self.keep < n - 1

    def tokens_after(self, n: int) -> int:
        return self.keep + 1 if self.acts(n) else n

    def __call__(self, x, scores=None, keys=None, size=None) -> Reduced:
        kept = flip.random_keep(x.shape[0], x.shape[1] - 1, self.keep, device=x.device)
        return Reduced(flip.keep_patches(x, kept), size, kept, fused=False)
