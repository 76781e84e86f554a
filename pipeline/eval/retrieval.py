"""Zero-shot image-text retrieval, the ALBEF way: ITC ranks, ITM re-ranks the top k.

Every rank encodes the whole (small) evaluation set; the expensive ITM re-ranking is split
across ranks by rows and summed. An image counts as found at the best rank among its captions.
The model is a :class:`~pipeline.models.contracts.RetrievalModel` (``image_features``,
``text_features``) and usually an :class:`~pipeline.models.contracts.ItmScorer` (ALBEF). A
model without ITC (METER) returns ``None`` features: ITM then scores every (image, caption)
pair, as METER's own evaluation does, and ``k_test`` is unused. A dual encoder without
``itm_scores`` (CLIP) is ranked by ITC alone.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.distributed as dist

from pipeline.data.loader import build_eval_loader
from pipeline.models.contracts import ItmScorer

log = logging.getLogger(__name__)

METRICS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")
UNRANKED = -1e4  # score of pairs outside the ITC top k


def recall_at_k(scores_i2t: np.ndarray, scores_t2i: np.ndarray, img2txt: list[list[int]], txt2img: list[int]) -> dict:
    """TR/IR R@1/5/10 in percent.

    Args:
        scores_i2t: ``[N_img, N_txt]``; scores_t2i: ``[N_txt, N_img]``.
        img2txt: the caption indices of each image; txt2img: the image index of each caption.
    """
    order = np.argsort(-scores_i2t, axis=1, kind="stable")
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(order.shape[1])[None].repeat(len(order), 0), axis=1)
    txt_ranks = np.array([position[i, caps].min() for i, caps in enumerate(img2txt)])
    order = np.argsort(-scores_t2i, axis=1, kind="stable")
    img_ranks = np.array([np.where(order[t] == txt2img[t])[0][0] for t in range(len(txt2img))])
    out = {}
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100.0 * float((txt_ranks < k).mean())
        out[f"img_r{k}"] = 100.0 * float((img_ranks < k).mean())
    out["txt_r_mean"] = (out["txt_r1"] + out["txt_r5"] + out["txt_r10"]) / 3
    out["img_r_mean"] = (out["img_r1"] + out["img_r5"] + out["img_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def chance_r1(img2txt: list[list[int]], num_texts: int) -> tuple[float, float]:
    """Expected R@1 (percent) of a random ranking: TR = mean captions per image / N_txt, IR = 1/N_img."""
    per_image = sum(len(c) for c in img2txt) / max(len(img2txt), 1)
    return 100.0 * per_image / num_texts, 100.0 / len(img2txt)


def _pad_cat(chunks: list[torch.Tensor], length: int) -> torch.Tensor:
    """Concatenate ``[b, L_i, ...]`` chunks along dim 0, zero-padding dim 1 to ``length``."""
    padded = []
    for c in chunks:
        pad = [0, 0] * (c.dim() - 2) + [0, length - c.shape[1]]
        padded.append(torch.nn.functional.pad(c, pad))
    return torch.cat(padded)


@torch.no_grad()
def _rerank(model, sims, query_embeds, cand_embeds, cand_mask, queries_are_images, k, rank, world):
    """Rows of ``sims`` ([Q, C]) this rank owns, re-scored by ITM on their top k; summed over ranks.

    Every rank makes the same number of ITM calls (the last one repeats a row and is dropped):
    under ZeRO-3 each call gathers parameters collectively, so uneven counts would hang.
    """
    Q, C = sims.shape
    k = min(k, C)
    scores = torch.zeros(Q, C, dtype=torch.float32, device=sims.device)
    step = math.ceil(Q / world)
    for q in range(rank * step, (rank + 1) * step):
        row_q = min(q, Q - 1)
        top = sims[row_q].topk(k).indices
        if queries_are_images:
            itm = model.itm_scores(query_embeds[row_q].expand(k, -1, -1), cand_embeds[top], cand_mask[top])
        else:
            itm = model.itm_scores(cand_embeds[top], query_embeds[0][row_q].expand(k, -1, -1),
                                   query_embeds[1][row_q].expand(k, -1))
        if q < Q:
            row = torch.full((C,), UNRANKED, device=sims.device)
            row[top] = itm.float()
            scores[q] = row
    if world > 1:
        dist.all_reduce(scores)
    return scores


@torch.no_grad()
def evaluate_shards(model, shards: str, *, image_size: int, batch_size: int = 64, k_test: int = 256,
                    max_words: int = 30, device=None, dtype=torch.float32, rank: int = 0, world_size: int = 1) -> dict:
    """Retrieval metrics of ``model`` on an evaluation shard set (``KEY.json`` with ``captions``)."""
    device = device or torch.device("cpu")
    loader = build_eval_loader(shards, image_size=image_size, batch_size=batch_size, max_words=max_words)
    image_embeds, image_feats, texts, img2txt, txt2img = [], [], [], [], []
    for batch in loader:
        embeds, feats = model.image_features(batch["image"].to(device, dtype))
        image_embeds.append(embeds)
        if feats is not None:
            image_feats.append(feats.float())
        for captions in batch["captions"]:
            img2txt.append(list(range(len(texts), len(texts) + len(captions))))
            txt2img.extend([len(img2txt) - 1] * len(captions))
            texts.extend(captions)
    if not texts:
        raise ValueError(f"eval.shards={shards!r}: no evaluation samples read")
    text_embeds, text_masks, text_feats = [], [], []
    for start in range(0, len(texts), batch_size):
        embeds, mask, feats = model.text_features(texts[start:start + batch_size], device)
        text_embeds.append(embeds)
        text_masks.append(mask)
        if feats is not None:
            text_feats.append(feats.float())
    length = max(e.shape[1] for e in text_embeds)
    text_embeds, text_masks = _pad_cat(text_embeds, length), _pad_cat(text_masks, length)
    # an adaptive budget's batches differ in length: its padding is zero rows, as the ViT's own
    image_embeds = _pad_cat(image_embeds, max(e.shape[1] for e in image_embeds))
    has_itc = bool(image_feats) and bool(text_feats)
    if has_itc:
        sims = torch.cat(image_feats) @ torch.cat(text_feats).T  # [N_img, N_txt]
        itc = recall_at_k(sims.cpu().numpy(), sims.T.cpu().numpy(), img2txt, txt2img)
    if not isinstance(model, ItmScorer):  # a dual encoder: ITC is the ranking
        metrics = dict(itc, ranked_by="itc")
    else:
        if not has_itc:  # no ITC: every pair goes to ITM
            sims = torch.zeros(len(image_embeds), len(text_embeds), device=image_embeds.device)
            k_test = max(sims.shape)
        i2t = _rerank(model, sims, image_embeds, text_embeds, text_masks, True, k_test, rank, world_size)
        if has_itc:
            t2i = _rerank(model, sims.T.contiguous(), (text_embeds, text_masks), image_embeds, None, False,
                          k_test, rank, world_size)
        else:  # every pair is already scored, and a pair's ITM score does not depend on the direction
            t2i = i2t.T.contiguous()
        metrics = recall_at_k(i2t.cpu().numpy(), t2i.cpu().numpy(), img2txt, txt2img)
        metrics["ranked_by"] = "itm"
    if has_itc:
        metrics.update({f"itc_{k}": itc[k] for k in METRICS})
    metrics["chance_txt_r1"], metrics["chance_img_r1"] = chance_r1(img2txt, len(texts))
    metrics["num_images"], metrics["num_texts"] = len(img2txt), len(texts)
    return metrics


def evaluate(model, cfg, *, device, dtype, rank: int, world_size: int) -> dict:
    """The trainer's hook: retrieval on ``cfg.eval.shards`` with the run's image size."""
    return evaluate_shards(model, cfg.eval.shards, image_size=cfg.data.image_size, batch_size=cfg.eval.batch_size,
                           k_test=cfg.eval.k_test, max_words=cfg.data.max_words, device=device, dtype=dtype,
                           rank=rank, world_size=world_size)


def format_table(metrics: dict) -> str:
    """The retrieval table a person reads, with chance levels."""
    lines = [
        f"zero-shot retrieval on {metrics['num_images']} images / {metrics['num_texts']} captions",
        "              R@1     R@5    R@10",
    ]
    if metrics.get("ranked_by", "itm") == "itm":
        lines += ["text  (ITM) {txt_r1:7.2f} {txt_r5:7.2f} {txt_r10:7.2f}".format(**metrics),
                  "image (ITM) {img_r1:7.2f} {img_r5:7.2f} {img_r10:7.2f}".format(**metrics)]
    if "itc_txt_r1" in metrics:
        lines += ["text  (ITC) {itc_txt_r1:7.2f} {itc_txt_r5:7.2f} {itc_txt_r10:7.2f}".format(**metrics),
                  "image (ITC) {itc_img_r1:7.2f} {itc_img_r5:7.2f} {itc_img_r10:7.2f}".format(**metrics)]
    else:
        lines.append("(no ITC in this model: ITM scored every image-caption pair)")
    lines.append("chance R@1: text {chance_txt_r1:.2f}, image {chance_img_r1:.2f}".format(**metrics))
    return "\n".join(lines)
