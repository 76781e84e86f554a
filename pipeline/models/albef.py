"""ALBEF (Li et al., "Align before Fuse") with ELIP token reduction in its ViT.

ViT image encoder, BERT text encoder (first ``text_layers``) and fusion encoder (the rest,
with cross-attention); ITC with momentum encoders and feature queues, momentum distillation,
ITM with hard negatives mined from the ITC similarities, MLM. The text encoder runs before the
ViT so its [CLS] can guide ELIP; the momentum (teacher) ViT runs unpruned, as in the official
ELIP code.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models import register_model
from pipeline.models.losses import concat_all_gather, itc_loss, mask_tokens, sample_hard_negatives
from pipeline.models.text import BertTextFusion, TextConfig, load_tokenizer
from pipeline.models.vit import VisionEncoder, VitConfig
from pipeline.tokens.plan import ReductionConfig


@dataclass
class AlbefConfig:
    """``model:`` section for ``name: albef`` (defaults: the paper's ViT-B/16 at 256 px + BERT-base)."""

    name: str = "albef"
    vision: VitConfig = field(default_factory=lambda: VitConfig(image_size=256))
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256
    temp: float = 0.07
    queue_size: int = 65536
    momentum: float = 0.995
    alpha: float = 0.4
    distill: bool = True
    mlm_probability: float = 0.15


class ALBEF(nn.Module):
    """``forward(batch) -> dict(loss, loss_itc, loss_itm, loss_mlm, tokens_per_layer, kept_patches)``."""

    def __init__(self, cfg: AlbefConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.text)
        self.visual_encoder = VisionEncoder(cfg.vision)
        self.text_encoder = BertTextFusion(cfg.text, len(self.tokenizer))
        width = self.text_encoder.config.hidden_size
        if width != self.visual_encoder.embed_dim:
            raise ValueError(
                f"model.vision width {self.visual_encoder.embed_dim} != model.text hidden_size {width}: "
                "ALBEF's fusion layers and ELIP's [CLS] fusion need equal widths"
            )
        self.patch_size = self.visual_encoder.patch_size
        self.text_guided = cfg.vision.reduction.method == "elip"
        self.vision_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(width, cfg.embed_dim)
        self.itm_head = nn.Linear(width, 2)
        # shape [1], not ALBEF's 0-dim: DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes
        self.temp = nn.Parameter(torch.tensor([cfg.temp]))

        # Momentum (teacher) encoders: same weights, no gradient, and an unpruned ViT.
        self.visual_encoder_m = VisionEncoder(replace(cfg.vision, reduction=ReductionConfig(), checkpoint=None))
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        self.model_pairs = [
            (self.visual_encoder, self.visual_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_encoder, self.text_encoder_m),
            (self.text_proj, self.text_proj_m),
        ]
        self._ema_shadow: list[torch.Tensor] | None = None  # fp32 EMA state in half precision
        self.copy_params()

        q = cfg.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, q), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, q), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # -- helpers -----------------------------------------------------------------------------
    def tokenize(self, texts: list[str], device: torch.device):
        return self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.cfg.text.max_tokens, return_tensors="pt"
        ).to(device)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)

    @torch.no_grad()
    def copy_params(self) -> None:
        """Reset the momentum encoders to the online weights (at init and after a warm start)."""
        for model, model_m in self.model_pairs:
            model_m.load_state_dict(model.state_dict())
            model_m.requires_grad_(False)
        self._ema_shadow = None

    @torch.no_grad()
    def _momentum_update(self) -> None:
        """EMA of the online weights into the momentum encoders.

        In bf16/fp16 an update of ``(1 - m) * (p - p_m)`` is far below the half type's
        resolution (bf16: 2^-8 relative) and would round away, freezing the teacher; so the EMA
        runs on fp32 shadows of the momentum weights (local partitions only under ZeRO-3) and
        only the result is cast down. The shadows start from the weights at the first update
        (also after a resume): one rounding, not one per step.
        """
        m = self.cfg.momentum
        pairs = [(p, p_m) for model, model_m in self.model_pairs
                 for p, p_m in zip(model.parameters(), model_m.parameters())]
        # Under ZeRO-3 a parameter's data is only its local partition (``ds_tensor``); both
        # copies are partitioned alike, so the update runs shard by shard.
        local = [(p.ds_tensor, p_m.ds_tensor) if hasattr(p, "ds_tensor") else (p.data, p_m.data) for p, p_m in pairs]
        if local[0][1].dtype == torch.float32:
            for src, dst in local:
                dst.mul_(m).add_(src.to(dst.dtype), alpha=1.0 - m)
            return
        if self._ema_shadow is None:
            self._ema_shadow = [dst.float() for _, dst in local]
        for (src, dst), shadow in zip(local, self._ema_shadow):
            shadow.mul_(m).add_(src.float(), alpha=1.0 - m)
            dst.copy_(shadow)

    @torch.no_grad()
    def _enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> None:
        """Push every rank's ``[B, E]`` momentum features into the ring-buffer queues."""
        image_feat, text_feat = concat_all_gather(image_feat), concat_all_gather(text_feat)
        q = self.image_queue.shape[1]
        idx = (self.queue_ptr + torch.arange(image_feat.shape[0], device=image_feat.device)) % q
        self.image_queue[:, idx] = image_feat.T.to(self.image_queue.dtype)
        self.text_queue[:, idx] = text_feat.T.to(self.text_queue.dtype)
        self.queue_ptr[0] = (self.queue_ptr[0] + image_feat.shape[0]) % q

    # -- training ------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        """One pre-training step's losses.

        Args:
            batch: ``image`` ``[B, 3, H, W]``, ``text`` list of B captions, optional
                ``epoch_progress`` (ramps the distillation weight over the first epoch).
        """
        images, device = batch["image"], batch["image"].device
        cfg = self.cfg
        alpha = cfg.alpha * min(1.0, float(batch.get("epoch_progress", 1.0))) if cfg.distill else 0.0
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

        tok = self.tokenize(batch["text"], device)
        ids, mask = tok.input_ids, tok.attention_mask
        text_embeds = self.text_encoder.encode_text(ids, mask)  # [B, L, D]
        vision = self.visual_encoder(
            images, text_cls=text_embeds[:, 0] if self.text_guided else None, track_patches=True
        )
        image_embeds = vision.tokens  # [B, N', D]
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

        with torch.no_grad():
            self._momentum_update()
            image_embeds_m = self.visual_encoder_m(images).tokens
            # contrastive arithmetic in fp32, like the queues it is compared with
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]).float(), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(self.text_encoder_m.encode_text(ids, mask)[:, 0]).float(), dim=-1)
            image_feat_all = torch.cat([image_feat_m.T, self.image_queue.clone()], dim=1)
            text_feat_all = torch.cat([text_feat_m.T, self.text_queue.clone()], dim=1)
            targets = torch.zeros(len(images), image_feat_all.shape[1], device=device)
            targets.fill_diagonal_(1)
            i2t_targets = t2i_targets = targets
            if alpha > 0:
                temp = self.temp.float()
                i2t_targets = alpha * F.softmax(image_feat_m @ text_feat_all / temp, dim=1) + (1 - alpha) * targets
                t2i_targets = alpha * F.softmax(text_feat_m @ image_feat_all / temp, dim=1) + (1 - alpha) * targets
        loss_itc, sim_i2t, sim_t2i = itc_loss(
            image_feat, text_feat, image_feat_all, text_feat_all, self.temp, i2t_targets, t2i_targets
        )
        self._enqueue(image_feat_m, text_feat_m)

        loss_itm = self._itm_loss(image_embeds, text_embeds, mask, sim_i2t, sim_t2i)
        loss_mlm = self._mlm_loss(ids, mask, image_embeds, image_embeds_m, alpha)
        return {
            "loss": loss_itc + loss_itm + loss_mlm,
            "loss_itc": loss_itc.detach(),
            "loss_itm": loss_itm.detach(),
            "loss_mlm": loss_mlm.detach(),
            "tokens_per_layer": vision.tokens_per_layer,
            "kept_patches": vision.kept_patches,
        }

    def _itm_loss(self, image_embeds, text_embeds, mask, sim_i2t, sim_t2i) -> torch.Tensor:
        B = len(image_embeds)
        neg_image, neg_text = sample_hard_negatives(sim_i2t[:, :B], sim_t2i[:, :B])
        text_all = torch.cat([text_embeds, text_embeds, text_embeds[neg_text]])
        mask_all = torch.cat([mask, mask, mask[neg_text]])
        image_all = torch.cat([image_embeds, image_embeds[neg_image], image_embeds])
        fused_cls = self.text_encoder.fuse(text_all, mask_all, image_all)[:, 0]
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(image_embeds.device)
        return F.cross_entropy(self.itm_head(fused_cls), labels)

    def _mlm_loss(self, ids, mask, image_embeds, image_embeds_m, alpha) -> torch.Tensor:
        tok = self.tokenizer
        masked, labels = mask_tokens(
            ids, len(tok), tok.mask_token_id, [tok.pad_token_id, tok.cls_token_id, tok.sep_token_id],
            self.cfg.mlm_probability,
        )
        hidden = self.text_encoder.fuse(self.text_encoder.encode_text(masked, mask), mask, image_embeds)
        logits = self.text_encoder.mlm_logits(hidden)  # [B, L, V]
        predicted = labels != -100
        if not predicted.any():  # nothing masked in a tiny batch: a zero that keeps the graph
            return logits.sum() * 0.0
        loss = F.cross_entropy(logits[predicted], labels[predicted])
        if alpha > 0:
            with torch.no_grad():
                enc_m = self.text_encoder_m
                logits_m = enc_m.mlm_logits(enc_m.fuse(enc_m.encode_text(masked, mask), mask, image_embeds_m))
            distill = -(F.log_softmax(logits[predicted], -1) * F.softmax(logits_m[predicted], -1)).sum(-1).mean()
            loss = (1 - alpha) * loss + alpha * distill
        return loss

    # -- retrieval -----------------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, H, W]`` -> ``(image_embeds [B, N', D], image_feat [B, E])``; vision-only selection."""
        embeds = self.visual_encoder(images).tokens
        return embeds, F.normalize(self.vision_proj(embeds[:, 0]), dim=-1)

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
