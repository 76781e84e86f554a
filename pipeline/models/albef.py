"""ALBEF (Li et al., "Align before Fuse") with ELIP token reduction in its ViT.

ViT image encoder, BERT text encoder (first ``text_layers``) and fusion encoder (the rest,
with cross-attention); ITC with momentum encoders and feature queues, momentum distillation,
ITM with hard negatives mined from the ITC similarities, MLM. The text encoder runs before the
ViT so its [CLS] can guide ELIP; the momentum (teacher) ViT runs unpruned, as in the official
ELIP code. Retrieval fine-tuning is the same model with ``objectives: [itc, itm]`` and
``positives_key: image_id`` (ALBEF's ``model_retrieval.py``: no MLM, captions of one image are
positives in ITC and never ITM negatives).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models import register_model
from pipeline.models.losses import mask_tokens, sample_hard_negatives
from pipeline.models.momentum import MomentumConfig, MomentumContrast, check_objectives, same_image
from pipeline.models.pairing import check_pairing
from pipeline.models.text import BertTextFusion, load_tokenizer
from pipeline.models.vit import VisionEncoder, VitConfig


ALBEF_OBJECTIVES = ("itc", "itm", "mlm")


@dataclass
class AlbefConfig(MomentumConfig):
    """``model:`` section for ``name: albef`` (defaults: the paper's ViT-B/16 at 256 px + BERT-base)."""

    name: str = "albef"
    vision: VitConfig = field(default_factory=lambda: VitConfig(image_size=256))
    mlm_probability: float = 0.15
    objectives: list[str] = field(default_factory=lambda: ["itc", "itm", "mlm"])  # itc always


def add_encoders(module: nn.Module, cfg) -> int:
    """Give ``module`` ALBEF's tokenizer, ViT (``visual_encoder``) and text/fusion BERT
    (``text_encoder``) under ALBEF's names, so that fine-tuning heads take a pre-training run's
    weights through ``train.init_from``; sets ``image_first`` and ``patch_size`` and returns the
    shared width."""
    module.tokenizer = load_tokenizer(cfg.text)
    module.visual_encoder = VisionEncoder(cfg.vision)
    module.text_encoder = BertTextFusion(cfg.text, len(module.tokenizer))
    width = module.text_encoder.config.hidden_size
    module.image_first = check_pairing(cfg, module.visual_encoder, width,
                                       "ALBEF's fusion layers and ELIP's [CLS] fusion need equal widths")
    module.patch_size = module.visual_encoder.patch_size
    return width


class ALBEF(MomentumContrast):
    """``forward(batch) -> dict(loss, loss_itc, loss_itm, loss_mlm, tokens_per_layer, kept_patches)``."""

    def __init__(self, cfg: AlbefConfig):
        super().__init__()
        self.cfg = cfg
        check_objectives(cfg.objectives, ALBEF_OBJECTIVES, required="itc")
        width = add_encoders(self, cfg)
        self.vision_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(width, cfg.embed_dim)
        self.itm_head = nn.Linear(width, 2)
        self.init_momentum(cfg)  # teacher copies (unpruned ViT), queues, temperature

    # -- training ------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        """One pre-training step's losses.

        Args:
            batch: ``image`` ``[B, 3, H, W]``, ``text`` list of B captions, optional
                ``epoch_progress`` (ramps the distillation weight over the first epoch).
        """
        step = self.itc_step(batch)
        text, image_embeds = step.text, step.vision.tokens  # [B, L', D] (L' < L when text is pruned), [B, N', D]
        losses = {}
        if "itm" in self.cfg.objectives:
            losses["itm"] = self._itm_loss(image_embeds, text.hidden, text.mask, step.sim_i2t, step.sim_t2i, step.idx)
        if "mlm" in self.cfg.objectives:
            losses["mlm"] = self._mlm_loss(step.ids, step.mask, text.index, image_embeds, step.image_embeds_m, step.alpha)
        return self.outputs(step, **losses)

    def _itm_loss(self, image_embeds, text_embeds, mask, sim_i2t, sim_t2i, idx=None) -> torch.Tensor:
        B = len(image_embeds)
        neg_image, neg_text = sample_hard_negatives(sim_i2t[:, :B], sim_t2i[:, :B], positives=same_image(idx))
        text_all = torch.cat([text_embeds, text_embeds, text_embeds[neg_text]])
        mask_all = torch.cat([mask, mask, mask[neg_text]])
        image_all = torch.cat([image_embeds, image_embeds[neg_image], image_embeds])
        fused_cls = self.text_encoder.fuse(text_all, mask_all, image_all)[:, 0]
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(image_embeds.device)
        return F.cross_entropy(self.itm_head(fused_cls), labels)

    def _mlm_loss(self, ids, mask, index, image_embeds, image_embeds_m, alpha) -> torch.Tensor:
        tok = self.tokenizer
        masked, labels = mask_tokens(
            ids, len(tok), tok.mask_token_id, [tok.pad_token_id, tok.cls_token_id, tok.sep_token_id],
            self.cfg.mlm_probability,
        )
        text = self.text_encoder.encode(masked, mask, index=index)  # pruned like the ITC pass
        if index is not None:
            labels = labels.gather(1, index)
        hidden = self.text_encoder.fuse(text.hidden, text.mask, image_embeds)
        logits = self.text_encoder.mlm_logits(hidden)  # [B, L', V]
        predicted = labels != -100
        if not predicted.any():  # nothing masked in a tiny batch: a zero that keeps the graph
            return logits.sum() * 0.0
        loss = F.cross_entropy(logits[predicted], labels[predicted])
        if alpha > 0:
            with torch.no_grad():
                enc_m = self.text_encoder_m
                text_m = enc_m.encode(masked, mask, index=index)
                logits_m = enc_m.mlm_logits(enc_m.fuse(text_m.hidden, text_m.mask, image_embeds_m))
            distill = -(F.log_softmax(logits[predicted], -1) * F.softmax(logits_m[predicted], -1)).sum(-1).mean()
            loss = (1 - alpha) * loss + alpha * distill
        return loss

    # -- retrieval (image_features: MomentumContrast) -------------------------------------------
    @torch.no_grad()
    def text_features(self, texts: list[str], device: torch.device):
        """B captions -> ``(text_embeds [B, L, D], mask [B, L], text_feat [B, E])``."""
        tok = self.tokenize(texts, device)
        embeds = self.text_encoder.encode_text(tok.input_ids, tok.attention_mask)
        return embeds, tok.attention_mask, F.normalize(self.text_proj(embeds[:, 0]), dim=-1)

    @torch.no_grad()
    def itm_scores(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Match logits ``[K]`` for K (image, text) pairs: ``[K, N', D]``, ``[K, L, D]``, ``[K, L]``."""
        fused_cls = self.text_encoder.fuse(text_embeds, mask, image_embeds)[:, 0]
        return self.itm_head(fused_cls)[:, 1].float()


register_model("albef", AlbefConfig, ALBEF)
