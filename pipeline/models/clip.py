"""A CLIP-style dual encoder: the ViT and BERT text encoder of the fusion backbones, trained
with in-batch contrastive loss over all ranks (open_clip's recipe).

Two uses: a baseline that spends no fusion compute, and the unimodal warm start of ALBEF /
BLIP. Those papers start from pre-trained encoders (DeiT, BERT); a model trained from random
weights has near-identical [CLS] features for every input, and ALBEF's contrastive loss, whose
keys are momentum features without gradient, cannot pull them apart. In-batch contrastive loss
can, because both sides get gradient. The parameter names match ALBEF's (``visual_encoder``,
``text_encoder``, ``vision_proj``, ``text_proj``, ``temp``), so ``train.init_from`` copies them over.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models import register_model
from pipeline.models.losses import clip_loss
from pipeline.models.text import BertTextFusion, TextConfig, load_tokenizer, tokenize
from pipeline.models.vit import VisionEncoder, VitConfig


@dataclass
class ClipConfig:
    """``model:`` section for ``name: clip``. ``text.text_layers`` BERT layers are built (the
    text half of a fusion backbone with the same ``text`` section)."""

    name: str = "clip"
    vision: VitConfig = field(default_factory=lambda: VitConfig(image_size=224))
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256
    temp: float = 0.07


class CLIP(nn.Module):
    """``forward(batch) -> dict(loss, loss_itc, tokens_per_layer, kept_patches)``."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.text)
        self.visual_encoder = VisionEncoder(cfg.vision)
        self.text_encoder = BertTextFusion(cfg.text, len(self.tokenizer), text_only=True)
        self.patch_size = self.visual_encoder.patch_size
        self.vision_proj = nn.Linear(self.visual_encoder.embed_dim, cfg.embed_dim)
        self.text_proj = nn.Linear(self.text_encoder.config.hidden_size, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor([cfg.temp]))  # shape [1]: see ALBEF

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)

    def forward(self, batch: dict) -> dict:
        """In-batch ITC. ``batch["image"]``: ``[B, 3, H, W]``; ``batch["text"]``: B captions."""
        images = batch["image"]
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        vision = self.visual_encoder(images, track_patches=True)
        image_feat = F.normalize(self.vision_proj(vision.tokens[:, 0]), dim=-1)
        _, _, text_feat = self._text(batch["text"], images.device)
        loss = clip_loss(image_feat, text_feat, self.temp)
        return {"loss": loss, "loss_itc": loss.detach(), "tokens_per_layer": vision.tokens_per_layer,
                "kept_patches": vision.kept_patches}

    def _text(self, texts: list[str], device: torch.device):
        tok = tokenize(self.tokenizer, texts, self.cfg.text.max_tokens, device)
        embeds = self.text_encoder.encode_text(tok.input_ids, tok.attention_mask)
        return embeds, tok.attention_mask, F.normalize(self.text_proj(embeds[:, 0]), dim=-1)

    # -- retrieval (ITC only: a dual encoder has no ITM head) ----------------------------------
    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, H, W]`` -> ``(image_embeds [B, N', D], image_feat [B, E])``."""
        embeds = self.visual_encoder(images).tokens
        return embeds, F.normalize(self.vision_proj(embeds[:, 0]), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str], device: torch.device):
        """B captions -> ``(text_embeds [B, L, D], mask [B, L], text_feat [B, E])``."""
        return self._text(texts, device)


register_model("clip", ClipConfig, CLIP)
