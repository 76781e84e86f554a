"""ALBEF fine-tuned for NLVR2: is a statement true of a pair of images?

Both images go through the (ELIP-pruned, text-guided) ViT, the statement through the text
layers, and the fusion layers fuse the statement with each image in turn; ALBEF-style head
``Linear(2D, D) -> ReLU -> Linear(D, 2)`` classifies the two fused [CLS] side by side (left,
right). The encoders are ALBEF's (``albef.add_encoders``, ALBEF's parameter names), so
``train.init_from`` a pre-training run copies all of them; the head starts fresh.

What the official code does (salesforce/ALBEF ``models/model_nlvr.py``, ``Pretrain_nlvr.py``,
``configs/NLVR.yaml``) and where this differs:

- Official: the BERT has 18 layers, 6 text + 12 fusion: each pre-trained fusion layer is
  duplicated into two consecutive layers (``Pretrain_nlvr.py`` maps layer l to 2l-6 and
  2l-5) whose cross-attention reads image 0 and image 1 alternately, the pair sharing its
  cross-attention key/value projections (``share_cross_attention``), so the statement's tokens
  carry what they read from one image into the layer that reads the other. The [CLS] of the
  last layer goes through ``Linear(D, D) -> ReLU -> Linear(D, 2)``.
  Here: the pre-trained fusion layers are kept as they are (no duplication, so ``init_from``
  copies them by name) and run once per image with all weights shared; the images meet only in
  the head, which reads both fused [CLS] (hence its ``2D`` input). A statement comparing the
  images ("the left image has more circles than the right one") is decided from two
  statement-conditioned summaries rather than from tokens that have attended to both.
- Official: before fine-tuning, one epoch of *text assignment* (TA) pre-training on the
  pre-training captions (``Pretrain_nlvr.py``: does the text match image 0, image 1 or
  neither) initialises the duplicated layers. **TA is skipped here**: fine-tuning starts from
  the pre-training run directly.
- Official: momentum distillation (alpha 0.4, a momentum copy of the whole model). This head
  trains on the labels alone (no teacher), as ``albef_ve``.
- The statement is encoded once per image (the text layers run on 2B copies): the same code
  path serves ELIP (text [CLS] guides each image's pruning) and learned text pruning (each
  image's [CLS] prunes its copy of the statement). At ALBEF's sizes the text layers over ~30
  tokens cost little next to the ViT over two 384 px images.

Labels: each sample's ``KEY.json`` ``label`` (true -> 1, false -> 0), as data_prep's ``nlvr2``
and ``synthetic_nlvr2`` write it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models import register_model
from pipeline.models.albef import add_encoders
from pipeline.models.pairing import encode_pair
from pipeline.models.text import TextConfig, tokenize
from pipeline.models.vit import VitConfig


@dataclass
class AlbefNlvr2Config:
    """``model:`` section for ``name: albef_nlvr2`` (ALBEF's ViT-B/16 at 384 px + BERT-base)."""

    name: str = "albef_nlvr2"
    vision: VitConfig = field(default_factory=lambda: VitConfig(image_size=384))
    text: TextConfig = field(default_factory=TextConfig)


class AlbefNLVR2(nn.Module):
    """``forward(batch) -> dict(loss, loss_nlvr2, tokens_per_layer, kept_patches)``;
    ``classify(pairs, statements) -> logits [B, 2]`` (class 1 = true); labels from each
    sample's ``KEY.json`` ``label`` (``batch["meta"]``)."""

    num_classes = 2
    label_key = "label"

    def __init__(self, cfg: AlbefNlvr2Config):
        super().__init__()
        self.cfg = cfg
        width = add_encoders(self, cfg)
        self.cls_head = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, self.num_classes))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)

    def _logits(self, pairs: torch.Tensor, texts: list[str]):
        """``[B, 2, 3, H, W]`` image pairs (left, right) and B statements -> (``[B, 2]`` logits,
        the ViT's output over the 2B images in the order left 0, right 0, left 1, ...)."""
        if pairs.dim() != 5 or pairs.shape[1] != 2:
            raise ValueError(f"albef_nlvr2 takes image pairs [B, 2, 3, H, W], got {list(pairs.shape)}: "
                             "NLVR2 shards (KEY.left.jpg, KEY.right.jpg) from python -m data_prep nlvr2 / synthetic_nlvr2")
        B = len(pairs)
        tok = tokenize(self.tokenizer, texts, self.cfg.text.max_tokens, pairs.device)
        ids, mask = tok.input_ids.repeat_interleave(2, 0), tok.attention_mask.repeat_interleave(2, 0)  # [2B, L]
        text, vision = encode_pair(self.visual_encoder, self.text_encoder.encode, pairs.flatten(0, 1), ids, mask,
                                   self.image_first)
        fused_cls = self.text_encoder.fuse(text.hidden, text.mask, vision.tokens)[:, 0]  # [2B, D]
        return self.cls_head(fused_cls.reshape(B, -1)), vision  # [B, 2D]: left then right [CLS]

    def labels(self, metas: list[dict], device, keys: list[str] | None = None) -> torch.Tensor:
        """``[B]`` 0/1 from the samples' boolean ``KEY.json`` ``label``; samples without one are
        named (by ``keys``, else their ``identifier``)."""
        names = keys or [m.get("identifier", i) for i, m in enumerate(metas)]
        bad = [n for n, m in zip(names, metas) if not isinstance(m.get(self.label_key), bool)]
        if bad:
            raise ValueError(f"samples {bad[:3]}: KEY.json has no boolean {self.label_key!r} "
                             "(NLVR2 shards: python -m data_prep nlvr2 / synthetic_nlvr2)")
        return torch.tensor([int(m[self.label_key]) for m in metas], dtype=torch.long, device=device)

    def forward(self, batch: dict) -> dict:
        """Cross-entropy of true/false. ``batch``: ``image`` ``[B, 2, 3, H, W]``, ``text`` B
        statements, ``meta`` B ``KEY.json`` dicts, optional ``key``."""
        logits, vision = self._logits(batch["image"], batch["text"])
        labels = self.labels(batch["meta"], logits.device, batch.get("key"))
        loss = F.cross_entropy(logits, labels)
        return {"loss": loss, "loss_nlvr2": loss.detach(), "tokens_per_layer": vision.tokens_per_layer,
                "kept_patches": vision.kept_patches}

    @torch.no_grad()
    def classify(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Evaluation: ``[B, 2, 3, H, W]`` pairs -> ``[B, 2]`` logits (class 1 = true)."""
        return self._logits(images, texts)[0].float()


register_model("albef_nlvr2", AlbefNlvr2Config, AlbefNLVR2, eval_task="classify")
