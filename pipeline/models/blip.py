"""BLIP (Li et al., "Bootstrapping Language-Image Pre-training") with ELIP in its ViT.

Pre-training objectives as in BLIP's ``blip_pretrain.py``: ITC with momentum encoders and
queues (shared with ALBEF, :mod:`pipeline.models.momentum`), ITM with hard negatives through the
image-grounded text encoder ([ENC] first, every layer cross-attends to the image), and LM through
the image-grounded text decoder ([DEC] first, causal). Encoder and decoder share every weight
but the self-attention, as BLIP ties them: embeddings, cross-attention and feed-forward layers
are the encoder's own modules, the decoder adds one causal self-attention per layer and uses
the (tied) LM head. The unimodal text encoder is the same BERT without cross-attention; its
[CLS] guides ELIP, and the teacher ViT runs unpruned, as in the official ELIP code.

``model.objectives`` picks the fine-tuning tasks from the same model: ``[itc, itm]`` with
``positives_key: image_id`` is BLIP's retrieval fine-tuning (``blip_retrieval.py``), ``[lm]``
its caption fine-tuning (``BLIP_Decoder`` in ``blip.py``: the captions continue ``prompt``,
whose tokens are not predicted, and the ViT prunes vision-only, as when it captions).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.bert.modeling_bert import BertAttention

from pipeline.models import register_model
from pipeline.models.losses import sample_hard_negatives
from pipeline.models.layers import bert_init, checkpointed
from pipeline.models.momentum import MomentumConfig, MomentumContrast, check_objectives, same_image
from pipeline.models.pairing import check_pairing
from pipeline.models.text import BertTextFusion, TextConfig, causal_bias, load_tokenizer
from pipeline.models.vit import VisionEncoder, VitConfig


BLIP_OBJECTIVES = ("itc", "itm", "lm")


@dataclass
class BlipConfig(MomentumConfig):
    """``model:`` section for ``name: blip`` (defaults: BLIP's ViT-B/16 at 224 px + BERT-base).

    ``text.text_layers`` must equal the BERT depth: BLIP's unimodal encoder runs every layer.
    ``prompt`` is BLIP's captioning prompt; ``label_smoothing`` its LM loss's.
    """

    name: str = "blip"
    vision: VitConfig = field(default_factory=lambda: VitConfig(image_size=224))
    text: TextConfig = field(default_factory=lambda: TextConfig(text_layers=12))
    queue_size: int = 57600
    label_smoothing: float = 0.1
    prompt: str = "a picture of "
    objectives: list[str] = field(default_factory=lambda: ["itc", "itm", "lm"])


def add_encoders(module: nn.Module, cfg) -> int:
    """Give ``module`` BLIP's tokenizer ([DEC] and [ENC] added), ViT (``visual_encoder``) and text
    encoder (``text_encoder``, every layer able to cross-attend) under BLIP's names and
    ``enc_token_id``, so that fine-tuning heads take a pre-training run's weights through
    ``train.init_from``; sets ``image_first`` and ``patch_size`` and returns the shared width."""
    module.tokenizer = load_tokenizer(cfg.text)
    # BLIP's tokenizer: [DEC] starts a caption for the decoder, [ENC] one for the ITM encoder
    module.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    module.enc_token_id = module.tokenizer.convert_tokens_to_ids("[ENC]")
    module.visual_encoder = VisionEncoder(cfg.vision)
    module.text_encoder = BertTextFusion(cfg.text, len(module.tokenizer), cross_attention_from=0)
    config = module.text_encoder.config
    if cfg.text.text_layers != config.num_hidden_layers:
        raise ValueError(
            f"model.text.text_layers={cfg.text.text_layers} must equal the BERT depth {config.num_hidden_layers} "
            "for BLIP: its unimodal text encoder runs every layer"
        )
    module.image_first = check_pairing(cfg, module.visual_encoder, config.hidden_size,
                                       "BLIP's cross-attention here and ELIP's [CLS] fusion need equal widths")
    module.patch_size = module.visual_encoder.patch_size
    return config.hidden_size


class BLIP(MomentumContrast):
    """``forward(batch) -> dict(loss, loss_itc, loss_itm, loss_lm, tokens_per_layer, kept_patches)``."""

    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.cfg = cfg
        check_objectives(cfg.objectives, BLIP_OBJECTIVES)
        if "itm" in cfg.objectives and "itc" not in cfg.objectives:
            raise ValueError(f"model.objectives={cfg.objectives}: itm draws its hard negatives from itc; add itc")
        width = add_encoders(self, cfg)
        config = self.text_encoder.config
        # The decoder's own causal self-attention, one per layer: all it does not share.
        self.text_decoder_attention = nn.ModuleList(
            BertAttention(config, is_causal=True, layer_idx=i)
            for i in range(config.num_hidden_layers)
        )
        if cfg.text.pretrained is not None:  # BLIP initialises its decoder from the same BERT
            for attn, layer in zip(self.text_decoder_attention, self.text_encoder.encoder.layer):
                attn.load_state_dict(layer.attention.state_dict())
        else:
            std = self.text_encoder.config.initializer_range
            self.text_decoder_attention.apply(lambda m: bert_init(m, std))
        self.vision_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(width, cfg.embed_dim)
        self.itm_head = nn.Linear(width, 2)
        if "itc" in cfg.objectives:
            self.init_momentum(cfg)  # teacher copies (unpruned ViT), queues, temperature
        else:  # caption fine-tuning has no teacher (BLIP_Decoder)
            self.model_pairs = []

    decoder_grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.decoder_grad_checkpointing = enable

    # -- the image-grounded text decoder -------------------------------------------------------
    def _decoder_layer(self, i: int, hidden: torch.Tensor, self_bias: torch.Tensor, image_embeds: torch.Tensor):
        """Decoder layer ``i``: its causal self-attention, then encoder layer ``i``'s cross-attention and FFN."""
        layer = self.text_encoder.encoder.layer[i]
        hidden = self.text_decoder_attention[i](hidden, self_bias)[0]
        hidden = layer.crossattention(hidden, None, image_embeds, None)[0]
        return layer.feed_forward_chunk(hidden)

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Next-token logits. ``input_ids``/``attention_mask`` ``[B, L]`` ([DEC] first), image ``[B, N, D]``
        -> ``[B, L, V]``."""
        enc = self.text_encoder
        hidden = enc.embeddings(input_ids=input_ids)
        bias = causal_bias(attention_mask, hidden.dtype)
        image_embeds = image_embeds.to(hidden.dtype)
        for i in range(len(self.text_decoder_attention)):
            hidden = checkpointed(self.decoder_grad_checkpointing and self.training, self._decoder_layer,
                                  i, hidden, bias, image_embeds)
        return enc.mlm_logits(hidden)

    # -- training ------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        """One pre-training step's losses (ITC + ITM + LM, summed as in BLIP).

        Args:
            batch: ``image`` ``[B, 3, H, W]``, ``text`` list of B captions, optional
                ``epoch_progress`` (ramps the distillation weight over the first epoch).
        """
        if "itc" not in self.cfg.objectives:
            return self._caption_step(batch)
        step = self.itc_step(batch)
        image_embeds = step.vision.tokens  # [B, N', D]
        losses = {}
        if "itm" in self.cfg.objectives:
            losses["itm"] = self._itm_loss(step.ids, step.mask, step.text.index, image_embeds,
                                           step.sim_i2t, step.sim_t2i, step.idx)
        if "lm" in self.cfg.objectives:
            losses["lm"] = self._lm_loss(step.ids, step.mask, image_embeds)
        return self.outputs(step, **losses)

    def _caption_step(self, batch: dict) -> dict:
        """Caption fine-tuning (``objectives: [lm]``): the LM loss of ``prompt`` + caption on the
        vision-only pruned ViT, the prompt's tokens not predicted (BLIP_Decoder)."""
        images = batch["image"]
        vision = self.visual_encoder(images)
        tok = self.tokenize([self.cfg.prompt + t for t in batch["text"]], images.device)
        prompt_length = len(self.tokenizer(self.cfg.prompt).input_ids) - 1  # [CLS] + prompt, no [SEP]
        loss = self._lm_loss(tok.input_ids, tok.attention_mask, vision.tokens, prompt_length)
        return {"loss": loss, "loss_lm": loss.detach(), "tokens_per_layer": vision.tokens_per_layer,
                "kept_patches": vision.kept_patches}

    def _itm_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of the captions with [ENC] in place of [CLS]: ``[B, L]`` -> ``[B, L, D]``."""
        enc_ids = ids.clone()
        enc_ids[:, 0] = self.enc_token_id
        return self.text_encoder.embeddings(input_ids=enc_ids)

    def _itm_loss(self, ids, mask, index, image_embeds, sim_i2t, sim_t2i, idx=None) -> torch.Tensor:
        """Positives, then a hard negative image per caption and a hard negative caption per
        image (never one of the same image id), through the image-grounded encoder in one batch of ``3B``."""
        B = len(image_embeds)
        neg_image, neg_text = sample_hard_negatives(sim_i2t[:, :B], sim_t2i[:, :B], positives=same_image(idx))
        embeds = self._itm_embeddings(ids)
        text_all = torch.cat([embeds, embeds, embeds[neg_text]])
        mask_all = torch.cat([mask, mask, mask[neg_text]])
        index_all = None if index is None else torch.cat([index, index, index[neg_text]])
        image_all = torch.cat([image_embeds, image_embeds[neg_image], image_embeds])
        fused = self.text_encoder.encode_embeds(text_all, mask_all, index=index_all, image_embeds=image_all)
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(image_embeds.device)
        return F.cross_entropy(self.itm_head(fused.hidden[:, 0]), labels)

    def _lm_loss(self, ids, mask, image_embeds, prompt_length: int = 0) -> torch.Tensor:
        """Captioning loss: [DEC] + caption, each token predicted from the ones before and the
        image; the first ``prompt_length`` tokens ([DEC] + a prompt) are context, not targets."""
        dec_ids = ids.clone()
        dec_ids[:, 0] = self.tokenizer.bos_token_id
        logits = self.decode(dec_ids, mask, image_embeds)  # [B, L, V]
        targets = dec_ids.masked_fill(mask == 0, -100)
        targets[:, :prompt_length] = -100
        targets = targets[:, 1:]
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
            ignore_index=-100, label_smoothing=self.cfg.label_smoothing,
        )

    # -- retrieval (image_features: MomentumContrast) -------------------------------------------
    @torch.no_grad()
    def text_features(self, texts: list[str], device: torch.device):
        """B captions -> ``(itm_embeds [B, L, D], mask [B, L], text_feat [B, E])``.

        ``itm_embeds`` are the [ENC] captions' embedding-layer outputs: BLIP's ITM encodes the
        caption again with the image, so that is all :meth:`itm_scores` needs to keep per caption.
        """
        tok = self.tokenize(texts, device)
        hidden = self.text_encoder.encode(tok.input_ids, tok.attention_mask).hidden
        return self._itm_embeddings(tok.input_ids), tok.attention_mask, F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    @torch.no_grad()
    def itm_scores(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Match logits ``[K]`` for K (image, text) pairs: ``[K, N', D]``, ``[K, L, D]``, ``[K, L]``."""
        fused = self.text_encoder.encode_embeds(text_embeds, mask, image_embeds=image_embeds)
        return self.itm_head(fused.hidden[:, 0])[:, 1].float()

    # -- captioning ----------------------------------------------------------------------------
    @property
    def caption_defaults(self) -> dict:
        """:meth:`generate_captions` keywords for ``python -m pipeline.eval caption``: BLIP's
        captioning settings (prompt "a picture of ", beam 3, at most 20 new tokens, at least 5)."""
        return dict(prompt=self.cfg.prompt, max_new_tokens=20, min_length=5, num_beams=3)

    @torch.no_grad()
    def generate_captions(
        self, images: torch.Tensor, *, prompt: str, max_new_tokens: int, min_length: int, num_beams: int
    ) -> list[str]:
        """Caption images with the image-grounded decoder (transformers' beam search).

        Args:
            images: ``[B, 3, H, W]`` normalised pixels (the ViT prunes vision-only, as in retrieval).
            prompt: text the captions continue (BLIP: ``"a picture of "``); not part of the result.
            max_new_tokens: most tokens generated after the prompt.
            min_length: fewest tokens generated after the prompt before [SEP] may end a caption.
            num_beams: beam width (1 = greedy).
        Returns:
            B captions without the prompt.
        """
        if max_new_tokens < 1 or not 0 <= min_length <= max_new_tokens or num_beams < 1:
            raise ValueError(
                f"generate_captions: need max_new_tokens >= 1, 0 <= min_length <= max_new_tokens and num_beams >= 1; "
                f"got max_new_tokens={max_new_tokens}, min_length={min_length}, num_beams={num_beams}"
            )
        from pipeline.models.generation import generate

        device = images.device
        image_embeds = self.visual_encoder(images).tokens
        prefix = self.tokenizer([prompt] * len(images), return_tensors="pt").input_ids[:, :-1].to(device)  # drop [SEP]
        prefix[:, 0] = self.tokenizer.bos_token_id  # [DEC] starts a caption
        tok = self.tokenizer
        out = generate(
            lambda ids, embeds: self.decode(ids, torch.ones_like(ids), embeds)[:, -1],
            prefix, image_embeds, vocab_size=len(tok), eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
            max_new_tokens=max_new_tokens, min_new_tokens=min_length, num_beams=num_beams,
        )
        return [c.strip() for c in tok.batch_decode(out[:, prefix.shape[1]:], skip_special_tokens=True)]


register_model("blip", BlipConfig, BLIP)
