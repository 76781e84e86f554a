"""METER (Dou et al., "An Empirical Study of Training End-to-End Vision-and-Language
Transformers") with ELIP in its CLIP ViT.

CLIP-style ViT-B/32 (timm ``vit_base_patch32_clip_*``; METER keeps 11 of CLIP's 12 layers) and a
BERT or RoBERTa text encoder, each output projected to the fusion width and tagged with a
token-type embedding; then a co-attention fusion of two streams (6 layers each): every text
layer self-attends and cross-attends to the image stream, every image layer to the text stream,
both reading the other's previous layer. ITM on the two pooled [CLS] tokens and MLM on the text
stream, each in its own forward pass as in METER (MLM on masked captions; ITM on captions with
their image or, for half of them, another image of the batch). ELIP: the text [CLS] taken
before the cross-modal projection guides the ViT (layers 2/4/9, ratios 0.9/0.7/0.45).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertLayer, BertOnlyMLMHead, BertPooler

from pipeline.models import register_model
from pipeline.models.losses import mask_tokens
from pipeline.models.layers import bert_config, bert_init, checkpointed
from pipeline.models.pairing import check_pairing, encode_pair
from pipeline.models.text import TextConfig, TextOutput, check_prune, load_tokenizer, padding_bias, run_layers, tokenize
from pipeline.models.vit import VisionEncoder, VitConfig
from pipeline.models.weights import check_key_account
from pipeline.tokens import budget
from pipeline.tokens.plan import ELIP_METER_B32, ReductionConfig

ITM_CHUNK = 256  # (image, text) pairs per fusion call when scoring retrieval candidates


def _meter_vision() -> VitConfig:
    layers, ratios = ELIP_METER_B32
    return VitConfig(
        model_name="vit_base_patch32_clip_224", image_size=224, timm_kwargs={"depth": 11},
        reduction=ReductionConfig(method="elip", elip_mode="lookahead", layers=list(layers), ratios=list(ratios)),
    )


@dataclass
class MeterConfig:
    """``model:`` section for ``name: meter`` (defaults: METER-CLIP-ViT-B/32 + BERT-base at 224 px).

    ``text.pretrained`` may be a local BERT or RoBERTa directory (``config.json`` decides);
    ``text.text_layers`` must equal its depth. ``fusion_layers`` co-attention layers per stream
    use the text encoder's width, heads and feed-forward size. ``lr_mult_cross_modal`` and
    ``lr_mult_head`` scale the learning rate of the cross-modal modules and of the MLM/ITM heads
    (METER: 5x), through the trainer's ``lr_scales()`` hook.
    """

    name: str = "meter"
    vision: VitConfig = field(default_factory=_meter_vision)
    text: TextConfig = field(default_factory=lambda: TextConfig(text_layers=12, max_tokens=50))
    fusion_layers: int = 6
    mlm_probability: float = 0.15
    lr_mult_cross_modal: float = 5.0
    lr_mult_head: float = 5.0


def _text_model(cfg: TextConfig, vocab_size: int) -> nn.Module:
    """A local BERT/RoBERTa (``text.pretrained``) or a random BERT from ``text.bert``, no pooler."""
    config = bert_config(cfg.pretrained, {} if cfg.pretrained else cfg.bert, "text", any_model=True)
    if cfg.pretrained is not None:
        model, info = AutoModel.from_pretrained(cfg.pretrained, config=config, add_pooling_layer=False,
                                                attn_implementation="sdpa", output_loading_info=True)
        # expected unused: the pooler and the pre-training heads (BERT's cls.*, RoBERTa's lm_head.*)
        check_key_account(f"text.pretrained={cfg.pretrained}", info["missing_keys"], info["unexpected_keys"],
                          may_leave=["*pooler.*", "cls.*", "lm_head.*", "*position_ids"])
        return model
    config.vocab_size = vocab_size
    config._attn_implementation = "sdpa"
    return BertModel(config, add_pooling_layer=False)


METER_WIDTH = 768  # the fusion width METER's init was chosen for


def init_fresh(module: nn.Module, width: int) -> None:
    """METER's init of its new layers (``objectives.init_weights``: N(0, 0.02), zero biases, unit
    norms), its std scaled by ``sqrt(768 / width)``, so it is METER's 0.02 at METER's width.

    Why scaled: a fresh ``Linear`` with std 0.02 maps unit-variance inputs to 0.02 * sqrt(width),
    0.55 at 768 but 0.16 at the tiny configs' 64. The first co-attention layer's image
    contribution to the text stream is the product of three such gains (image projection, value,
    output): about 17% of the text signal in METER, 0.4% at width 64, where the pooled text [CLS]
    then barely depends on the image (measured: 0.6%), the two pooled halves that ITM reads are
    nearly additive in text and image, and ITM sits at ln 2 (a warm-started tiny METER could not
    fit 8 pairs in 150 steps; with the scaled std it left ln 2 after about 100)."""
    std = 0.02 * (METER_WIDTH / width) ** 0.5
    module.apply(lambda m: bert_init(m, std))


def _tokenizer(cfg: TextConfig):
    path = cfg.tokenizer or cfg.pretrained
    if path and any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "merges.txt")):
        return AutoTokenizer.from_pretrained(path)  # RoBERTa's BPE or any saved tokenizer
    return load_tokenizer(cfg)


class MeterEncoders(nn.Module):
    """METER's encoders and co-attention fusion, without heads: what pre-training (:class:`METER`)
    and the downstream heads (``meter_vqa``) share, under the same parameter names, so that
    ``train.init_from`` a METER run copies every one of them."""

    # train.init_from from a CLIP dual encoder (METER starts from CLIP's ViT and a pre-trained
    # text encoder): its ``visual_encoder`` has METER's name already, its text encoder does not
    init_from_renames = {"text_encoder.": "text_transformer."}

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = _tokenizer(cfg.text)
        self.visual_encoder = VisionEncoder(cfg.vision)
        self.text_transformer = _text_model(cfg.text, len(self.tokenizer))
        text_config = self.text_transformer.config
        if cfg.text.text_layers != text_config.num_hidden_layers:
            raise ValueError(
                f"model.text.text_layers={cfg.text.text_layers} must equal the text encoder depth "
                f"{text_config.num_hidden_layers} for METER (the fusion is a separate module)"
            )
        self.prune_at = check_prune(cfg.text.prune, cfg.text.text_layers)
        width = text_config.hidden_size
        self.image_first = check_pairing(cfg, self.visual_encoder, width, "ELIP fuses the text [CLS] (before the "
                                         "cross-modal projection) with the image [CLS]")
        if cfg.fusion_layers < 1:
            raise ValueError(f"model.fusion_layers={cfg.fusion_layers} must be >= 1")
        fusion = BertConfig(
            vocab_size=len(self.tokenizer), hidden_size=width, num_attention_heads=text_config.num_attention_heads,
            intermediate_size=text_config.intermediate_size, num_hidden_layers=cfg.fusion_layers,
            hidden_dropout_prob=text_config.hidden_dropout_prob,
            attention_probs_dropout_prob=text_config.attention_probs_dropout_prob,
            is_decoder=True, add_cross_attention=True,  # transformers' BertLayer: self-, cross-attention, FFN
        )
        fusion._attn_implementation = "sdpa"
        self.fusion_config = fusion
        self.width = width
        self.cross_modal_text_transform = nn.Linear(width, width)
        self.cross_modal_image_transform = nn.Linear(self.visual_encoder.embed_dim, width)
        self.token_type_embeddings = nn.Embedding(2, width)
        self.cross_modal_text_layers = nn.ModuleList(BertLayer(fusion, layer_idx=i) for i in range(cfg.fusion_layers))
        self.cross_modal_image_layers = nn.ModuleList(BertLayer(fusion, layer_idx=i) for i in range(cfg.fusion_layers))
        self.cross_modal_text_pooler = BertPooler(fusion)  # dense + tanh on the stream's first token
        self.cross_modal_image_pooler = BertPooler(fusion)
        for module in (self.cross_modal_text_transform, self.cross_modal_image_transform, self.token_type_embeddings,
                       self.cross_modal_text_layers, self.cross_modal_image_layers, self.cross_modal_text_pooler,
                       self.cross_modal_image_pooler):
            init_fresh(module, width)
        self.patch_size = self.visual_encoder.patch_size
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        self.grad_checkpointing = enable

    def lr_scales(self) -> dict[str, float]:
        """Parameter-name prefixes and their learning-rate multipliers (METER's lr_mult_*)."""
        return {"cross_modal_": self.cfg.lr_mult_cross_modal}

    def tokenize(self, texts: list[str], device: torch.device):
        return tokenize(self.tokenizer, texts, self.cfg.text.max_tokens, device)

    # -- encoders and fusion -------------------------------------------------------------------
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor, image_cls=None, index=None) -> TextOutput:
        """Text encoder with the configured text-token pruning (training only): ``[B, L]`` -> :class:`TextOutput`."""
        hidden = self.text_transformer.embeddings(input_ids=ids)
        return run_layers(
            self.text_transformer.encoder.layer, hidden, mask, prune=self.cfg.text.prune,
            prune_at=self.prune_at if self.training else None, image_cls=image_cls, index=index,
            checkpointing=self.grad_checkpointing and self.training,
        )

    def fuse(self, text_hidden: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor):
        """Co-attention fusion.

        Args:
            text_hidden: ``[B, L, D]`` text encoder output; text_mask: ``[B, L]``;
            image_tokens: ``[B, N, D_v]`` ViT output.
        Returns:
            ``(text_feats [B, L, D], image_feats [B, N, D], cls_feats [B, 2D])``.
        """
        x = self.cross_modal_text_transform(text_hidden)
        y = self.cross_modal_image_transform(image_tokens.to(x.dtype))
        x = x + self.token_type_embeddings(torch.zeros_like(text_mask))
        y = y + self.token_type_embeddings(torch.ones(y.shape[:2], dtype=torch.long, device=y.device))
        text_bias = padding_bias(text_mask, x.dtype)
        # explicit zeros: a decoder-config layer without a mask would make its self-attention causal;
        # an adaptive budget's padding (zero rows of the ViT's output) is masked
        real = budget.real_tokens(image_tokens)
        image_bias = padding_bias(torch.ones(y.shape[:2], device=y.device) if real is None else real, y.dtype)
        for text_layer, image_layer in zip(self.cross_modal_text_layers, self.cross_modal_image_layers):
            x1 = self._layer(text_layer, x, text_bias, y, image_bias)
            y1 = self._layer(image_layer, y, image_bias, x, text_bias)
            x, y = x1, y1
        cls_feats = torch.cat([self.cross_modal_text_pooler(x), self.cross_modal_image_pooler(y)], dim=-1)
        return x, y, cls_feats

    def _layer(self, layer, hidden, bias, other, other_bias):
        return checkpointed(self.grad_checkpointing and self.training, layer, hidden, bias,
                            encoder_hidden_states=other, encoder_attention_mask=other_bias)

    def infer(self, ids, mask, images, index=None):
        """One METER pass: text, ViT (ELIP-guided by the text [CLS]), fusion.

        Returns ``(text, vision, text_feats, cls_feats)``; ``text`` is the (maybe pruned)
        :class:`TextOutput`, ``vision`` the :class:`~pipeline.models.vit.VisionOutput`.
        """
        text, vision = encode_pair(self.visual_encoder, self.encode_text, images, ids, mask, self.image_first,
                                   index=index)
        text_feats, _, cls_feats = self.fuse(text.hidden, text.mask, vision.tokens)
        return text, vision, text_feats, cls_feats


class METER(MeterEncoders):
    """``forward(batch) -> dict(loss, loss_itm, loss_mlm, tokens_per_layer, kept_patches)``."""

    def __init__(self, cfg: MeterConfig):
        super().__init__(cfg)
        self.mlm_score = BertOnlyMLMHead(self.fusion_config)
        self.itm_score = nn.Linear(2 * self.width, 2)
        for module in (self.mlm_score, self.itm_score):
            init_fresh(module, self.width)

    def lr_scales(self) -> dict[str, float]:
        head = self.cfg.lr_mult_head
        return super().lr_scales() | {"mlm_score.": head, "itm_score.": head}

    # -- training ------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        """One pre-training step: MLM and ITM, each its own pass as in METER.

        Args:
            batch: ``image`` ``[B, 3, H, W]`` (B >= 2: ITM negatives are other images of the
                batch), ``text`` list of B captions.
        """
        images, device = batch["image"], batch["image"].device
        B = len(images)
        if B < 2:
            raise ValueError(f"METER's ITM needs at least 2 samples per rank and micro-batch, got {B}")
        tok = self.tokenizer
        enc = self.tokenize(batch["text"], device)
        ids, mask = enc.input_ids, enc.attention_mask

        # MLM on masked captions with their own images
        masked, labels = mask_tokens(ids, len(tok), tok.mask_token_id,
                                     [tok.pad_token_id, tok.cls_token_id, tok.sep_token_id], self.cfg.mlm_probability)
        text, vision, text_feats, _ = self.infer(masked, mask, images)
        if text.index is not None:
            labels = labels.gather(1, text.index)
        logits = self.mlm_score(text_feats)  # [B, L', V]
        predicted = labels != -100
        loss_mlm = F.cross_entropy(logits[predicted].float(), labels[predicted]) if predicted.any() else logits.sum() * 0.0

        # ITM: half the captions keep their image, the others get another image of the batch
        itm_labels, pick = itm_pairs(B)
        cls_feats = self.infer(ids, mask, images[pick.to(device)])[3]
        loss_itm = F.cross_entropy(self.itm_score(cls_feats).float(), itm_labels.to(device))
        return {  # token statistics of the MLM pass, whose rows are the batch's own images
            "loss": loss_itm + loss_mlm,
            "loss_itm": loss_itm.detach(),
            "loss_mlm": loss_mlm.detach(),
            "tokens_per_layer": vision.tokens_per_layer,
            "kept_patches": vision.kept_patches,
            "text_tokens_per_layer": text.tokens_per_layer,
        }

    # -- retrieval (no ITC: None features make pipeline.eval.retrieval score every pair by ITM) ---

    @torch.no_grad()
    def image_features(self, images: torch.Tensor):
        """``[B, 3, H, W]`` -> ``(image_embeds [B, N', D], None)``; vision-only selection."""
        return self.visual_encoder(images).tokens, None

    @torch.no_grad()
    def text_features(self, texts: list[str], device: torch.device):
        """B captions -> ``(text_embeds [B, L, D], mask [B, L], None)`` (whole captions)."""
        tok = self.tokenize(texts, device)
        text = self.encode_text(tok.input_ids, tok.attention_mask)
        return text.hidden, text.mask, None

    @torch.no_grad()
    def itm_scores(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Match logits ``[K]`` for K (image, text) pairs: ``[K, N', D]``, ``[K, L, D]``, ``[K, L]``."""
        scores = []
        for start in range(0, len(image_embeds), ITM_CHUNK):
            part = slice(start, start + ITM_CHUNK)
            cls_feats = self.fuse(text_embeds[part], mask[part], image_embeds[part])[2]
            scores.append(self.itm_score(cls_feats)[:, 1].float())
        return torch.cat(scores)


def itm_pairs(batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """METER's ITM pairs within a batch (its "false image" is another sample's).

    Returns ``(labels [B], image_index [B])``: ``B // 2`` captions at random positions keep their
    image (label 1); each other caption gets a different image of the batch (label 0).
    """
    labels = torch.cat([torch.ones(batch // 2), torch.zeros(batch - batch // 2)])
    labels = labels[torch.randperm(batch, generator=generator)].long()
    other = (torch.arange(batch) + torch.randint(1, batch, (batch,), generator=generator)) % batch  # never itself
    return labels, torch.where(labels.bool(), torch.arange(batch), other)


register_model("meter", MeterConfig, METER)
