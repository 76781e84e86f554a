"""ALBEF fine-tuned for visual entailment (SNLI-VE): a three-way classifier on the fused [CLS].

The image goes through the (ELIP-pruned, text-guided) ViT, the hypothesis through the text
layers, both through the fusion layers; ALBEF's head (``Linear(D, 2D) -> ReLU -> Linear(2D, 3)``)
classifies the fused [CLS]. The encoders carry ALBEF's parameter names, so ``train.init_from`` a
pre-training run copies them; the head starts fresh. ALBEF's VE recipe also distils from a
momentum copy (alpha 0.4); this head trains on the labels alone (no teacher).
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

VE_LABELS = ("entailment", "neutral", "contradiction")  # KEY.json label_id order (data_prep snli_ve)


@dataclass
class AlbefVeConfig:
    """``model:`` section for ``name: albef_ve`` (ALBEF's ViT-B/16 at 384 px + BERT-base)."""

    name: str = "albef_ve"
    vision: VitConfig = field(default_factory=lambda: VitConfig(image_size=384))
    text: TextConfig = field(default_factory=TextConfig)


class AlbefVE(nn.Module):
    """``forward(batch) -> dict(loss, loss_ve, tokens_per_layer, kept_patches)``;
    ``classify(images, texts) -> logits [B, 3]``; labels from each sample's ``KEY.json``
    ``label_id`` (``batch["meta"]``)."""

    num_classes = len(VE_LABELS)
    label_key = "label_id"

    def __init__(self, cfg: AlbefVeConfig):
        super().__init__()
        self.cfg = cfg
        width = add_encoders(self, cfg)
        self.cls_head = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, self.num_classes))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)

    def _logits(self, images: torch.Tensor, texts: list[str]):
        """``[B, 3, H, W]`` images and B hypotheses -> (``[B, 3]`` logits, the ViT's output)."""
        tok = tokenize(self.tokenizer, texts, self.cfg.text.max_tokens, images.device)
        text, vision = encode_pair(self.visual_encoder, self.text_encoder.encode, images, tok.input_ids,
                                   tok.attention_mask, self.image_first)
        fused_cls = self.text_encoder.fuse(text.hidden, text.mask, vision.tokens)[:, 0]
        return self.cls_head(fused_cls), vision

    def labels(self, metas: list[dict], device) -> torch.Tensor:
        """``[B]`` class ids from the samples' ``KEY.json`` (a sample without one is named)."""
        bad = [m.get("key", i) for i, m in enumerate(metas) if not isinstance(m.get(self.label_key), int)]
        if bad:
            raise ValueError(f"samples {bad[:3]}: KEY.json has no integer {self.label_key!r} "
                             "(SNLI-VE shards: python -m data_prep snli_ve / synthetic_ve)")
        return torch.tensor([m[self.label_key] for m in metas], device=device)

    def forward(self, batch: dict) -> dict:
        """Cross-entropy of the three labels. ``batch``: ``image`` ``[B, 3, H, W]``, ``text`` B
        hypotheses, ``meta`` B ``KEY.json`` dicts."""
        logits, vision = self._logits(batch["image"], batch["text"])
        labels = self.labels(batch["meta"], logits.device)
        loss = F.cross_entropy(logits, labels)
        return {"loss": loss, "loss_ve": loss.detach(), "tokens_per_layer": vision.tokens_per_layer, "kept_patches": vision.kept_patches}

    @torch.no_grad()
    def classify(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Evaluation: ``[B, 3]`` logits."""
        return self._logits(images, texts)[0].float()


register_model("albef_ve", AlbefVeConfig, AlbefVE, eval_task="classify")
