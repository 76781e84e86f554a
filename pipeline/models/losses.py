"""Pre-training objectives shared by the backbones: ITC, ITM hard negatives, MLM masking.

Pure tensor code apart from :func:`concat_all_gather` (feature queues see every rank's batch).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` on each of W ranks -> ``[W*B, ...]`` (no gradient); identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` on each of W ranks -> ``[W*B, ...]`` in rank order, where this rank's rows
    keep their gradient and the others are constants (open_clip's ``gather_with_grad=False``).
    Every rank computes the same loss over the global batch and back-propagates its own part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = list(concat_all_gather(x).chunk(dist.get_world_size()))
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def clip_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """Symmetric in-batch contrastive loss over the global batch.

    Args:
        image_feat, text_feat: ``[B, E]`` normalised features of this rank's pairs.
        temp: ``[1]`` temperature.
    Returns:
        scalar: mean of image->text and text->image cross-entropy, positives on the diagonal.
    """
    image_all, text_all = gather_with_local_grad(image_feat), gather_with_local_grad(text_feat)
    logits = image_all.float() @ text_all.float().T / temp.float()  # [W*B, W*B], fp32 in any precision
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum(targets * log_softmax(logits))``. Both ``[B, C]``."""
    return -(F.log_softmax(logits, dim=-1) * targets).sum(dim=-1).mean()


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_all: torch.Tensor,
    text_feat_all: torch.Tensor,
    temp: torch.Tensor,
    i2t_targets: torch.Tensor,
    t2i_targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ALBEF's image-text contrastive loss against momentum features (batch + queue).

    Args:
        image_feat, text_feat: ``[B, E]`` normalised features of this step.
        image_feat_all, text_feat_all: ``[E, B+Q]`` momentum features, batch first then queue.
        temp: scalar temperature.
        i2t_targets, t2i_targets: ``[B, B+Q]`` soft targets (the one-hot diagonal, mixed with
            the momentum model's similarities when distilling).
    Returns:
        ``(loss, sim_i2t [B, B+Q], sim_t2i [B, B+Q])``, in fp32 whatever the inputs' type: the
        queues are fp32 buffers and a softmax over tens of thousands of keys wants fp32.
    """
    temp = temp.float()
    sim_i2t = image_feat.float() @ text_feat_all.float() / temp
    sim_t2i = text_feat.float() @ image_feat_all.float() / temp
    loss = (soft_cross_entropy(sim_i2t, i2t_targets) + soft_cross_entropy(sim_t2i, t2i_targets)) / 2
    return loss, sim_i2t, sim_t2i


@torch.no_grad()
def sample_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, generator=None,
                          positives: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF's ITM hard negatives, drawn in proportion to in-batch contrastive similarity.

    Args:
        sim_i2t, sim_t2i: ``[B, B]`` in-batch similarities (logits).
        positives: ``[B, B]`` bool, pairs that are no negatives (retrieval fine-tuning: captions
            of the same image, ``idx == idx.T`` in ALBEF's ``model_retrieval.py``); default the
            diagonal.
    Returns:
        ``(neg_image_for_text [B], neg_text_for_image [B])`` indices, never the pair itself; a
        positive only when a row has nothing else (every sample of the batch shows one image).
    """
    B = sim_i2t.shape[0]
    if B < 2:
        raise ValueError(f"ITM hard negatives need at least 2 samples per rank and micro-batch, got {B}")
    eye = torch.eye(B, dtype=torch.bool, device=sim_i2t.device)
    allowed = ~eye if positives is None else ~(positives | eye)
    alone = ~allowed.any(dim=1)
    allowed[alone] = ~eye[alone]  # a row of one image only: any other sample rather than no negative
    # the floor keeps a row drawable when its softmax underflows, and only over allowed samples
    w_t2i = F.softmax(sim_t2i.float(), dim=1).masked_fill(~allowed, 0) + 1e-9 * allowed
    w_i2t = F.softmax(sim_i2t.float(), dim=1).masked_fill(~allowed, 0) + 1e-9 * allowed
    neg_image = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    neg_text = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
    return neg_image, neg_text


def positive_targets(idx: torch.Tensor, idx_all: torch.Tensor) -> torch.Tensor:
    """ITC targets that count every pair of the same image as positive (ALBEF / BLIP retrieval).

    Args:
        idx: ``[B]`` image ids of this step's captions.
        idx_all: ``[B+Q]`` image ids of the keys (the batch, then the queue; -100 = empty slot).
    Returns:
        ``[B, B+Q]`` rows summing to 1, uniform over the keys showing the row's image.
    """
    pos = (idx[:, None] == idx_all[None, :]).float()
    return pos / pos.sum(1, keepdim=True)


def mask_tokens(
    input_ids: torch.Tensor,
    vocab_size: int,
    mask_token_id: int,
    special_ids: list[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: of ``probability`` of the tokens, 80% -> [MASK], 10% -> random, 10% kept.

    Args:
        input_ids: ``[B, L]``; ``special_ids`` (pad, cls, sep) are never masked.
    Returns:
        ``(masked_ids [B, L], labels [B, L])`` with ``-100`` where no prediction is made.
    """
    device = input_ids.device
    ids, labels = input_ids.clone(), input_ids.clone()
    rand = lambda: torch.rand(ids.shape, generator=generator).to(device)  # noqa: E731
    chosen = rand() < probability
    for special in special_ids:
        chosen &= input_ids != special
    labels[~chosen] = -100
    to_mask = chosen & (rand() < 0.8)
    ids[to_mask] = mask_token_id
    to_random = chosen & ~to_mask & (rand() < 0.5)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator).to(device)
    ids[to_random] = random_ids[to_random]
    return ids, labels
