"""FLIP's patch dropout (Li et al., "Scaling Language-Image Pre-training via Masking"; open_clip's
``PatchDropout``): keep a random subset of the patch tokens at the ViT input, [CLS] always kept."""
from __future__ import annotations

import torch


def num_kept(num_patches: int, keep_rate: float) -> int:
    """Patches kept of ``num_patches`` at ``keep_rate`` (open_clip: ``max(1, int(M * (1 - p)))``)."""
    return max(1, int(num_patches * keep_rate))


def random_keep(batch: int, num_patches: int, keep: int, device: torch.device | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random subset of ``keep`` patch positions per sample, in ascending order.

    Draws from ``generator`` (default: torch's global RNG, so a run is deterministic under its
    seed and each sample and each step gets its own subset).

    Returns:
        ``[batch, keep]`` long, values in ``[0, num_patches)``, distinct within a row.
    """
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    return noise.topk(keep, dim=-1).indices.sort(dim=-1).values


def keep_patches(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Keep [CLS] and the patches at ``kept``.

    Args:
        x: ``[B, 1+M, D]`` tokens, [CLS] first; kept: ``[B, K]`` positions among the M patches.
    Returns:
        ``[B, 1+K, D]``; the gradient flows to the kept tokens only.
    """
    patches = x[:, 1:].gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :1], patches], dim=1)


def kept_index(kept_patches: torch.Tensor) -> torch.Tensor:
    """``[B, M]`` bool mask of kept patches -> ``[B, K]`` ascending positions, ``K`` the smallest
    count in the batch: an image that kept more gives up its last ones in raster order.

    Counts differ by a few when a later ELIP/EViT stage re-selects an earlier stage's fused token
    (which is no patch); FLIP's counts are equal and nothing is given up.
    """
    counts = kept_patches.sum(dim=1)
    k = int(counts.min()) if counts.numel() else 0
    # rank of each kept patch within its row; keep ranks below k
    rank = kept_patches.long().cumsum(dim=1) - 1
    take = kept_patches & (rank < k)
    return take.nonzero()[:, 1].view(kept_patches.shape[0], k)
