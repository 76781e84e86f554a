"""BERT text encoder, fusion encoder and MLM head built from transformers modules.

ALBEF splits one BERT: the first ``text_layers`` layers encode text alone; the remaining layers
add cross-attention to the image tokens (fusion). Module names mirror transformers' BERT
(``embeddings``, ``encoder.layer.N``, ``cls.predictions``) so a local ``bert-base-uncased``
directory loads straight in; only the cross-attention weights start from random, as in ALBEF.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from transformers import BertConfig, BertForMaskedLM, BertTokenizer
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertOnlyMLMHead

log = logging.getLogger(__name__)

TINY_TOKENIZER = str(Path(__file__).resolve().parent.parent / "configs" / "tiny_tokenizer")


@dataclass
class TextConfig:
    """The ``text`` section of a backbone config.

    ``pretrained``: a local BERT directory (``config.json`` + weights, e.g. bert-base-uncased);
    ``None`` builds a random BERT from ``bert`` (BertConfig keys; tiny test models).
    ``tokenizer``: a local tokenizer directory; default: ``pretrained``, else the shipped tiny
    vocabulary. ``text_layers``: layers without cross-attention (ALBEF: 6 of 12).
    """

    pretrained: str | None = None
    tokenizer: str | None = None
    bert: dict = field(default_factory=dict)
    text_layers: int = 6
    max_tokens: int = 30


def load_tokenizer(cfg: TextConfig) -> BertTokenizer:
    path = cfg.tokenizer or cfg.pretrained or TINY_TOKENIZER
    if not Path(path).is_dir():
        raise FileNotFoundError(f"text.tokenizer: {path} is not a directory with a vocab.txt")
    return BertTokenizer.from_pretrained(path)


def _bert_config(cfg: TextConfig, vocab_size: int) -> BertConfig:
    if cfg.pretrained is not None:
        if not (Path(cfg.pretrained) / "config.json").is_file():
            raise FileNotFoundError(f"text.pretrained: no config.json in {cfg.pretrained}")
        config = BertConfig.from_pretrained(cfg.pretrained)
    else:
        config = BertConfig(vocab_size=vocab_size, **cfg.bert)
    if not 0 <= cfg.text_layers <= config.num_hidden_layers:
        raise ValueError(
            f"text.text_layers={cfg.text_layers} must be within 0..{config.num_hidden_layers} (BERT depth)"
        )
    config._attn_implementation = "sdpa"
    return config


class _Encoder(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, L]`` 1/0 mask -> ``[B, 1, 1, L]`` additive bias (0 keep, -inf-ish drop)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def causal_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, L]`` padding mask -> ``[B, 1, L, L]`` causal + padding additive bias."""
    L = mask.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
    allowed = causal[None, None] & mask[:, None, None, :].bool()
    return (~allowed).to(dtype) * torch.finfo(dtype).min


class BertTextFusion(nn.Module):
    """BERT whose last layers cross-attend to image tokens, plus the (tied) MLM head.

    Attributes:
        config: the ``BertConfig``; hidden size ``D = config.hidden_size``.
    """

    def __init__(self, cfg: TextConfig, vocab_size: int, text_only: bool = False):
        super().__init__()
        self.config = _bert_config(cfg, vocab_size)
        self.text_layers = cfg.text_layers
        fusion_config = copy.deepcopy(self.config)
        fusion_config.is_decoder, fusion_config.add_cross_attention = True, True
        # text_only: a dual encoder (CLIP) has no fusion layers and no MLM head; its weights keep
        # the same names, so they load into the first layers of a fusion model.
        depth = cfg.text_layers if text_only else self.config.num_hidden_layers
        layers = [BertLayer(self.config if i < cfg.text_layers else fusion_config, layer_idx=i) for i in range(depth)]
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = _Encoder(layers)
        self.cls = None if text_only else BertOnlyMLMHead(self.config)
        self.apply(self._init)
        if self.cls is not None:
            self.cls.predictions.decoder.weight = self.embeddings.word_embeddings.weight  # tied, as in BERT
        if cfg.pretrained is not None:
            self._load_pretrained(cfg.pretrained)

    def _init(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _load_pretrained(self, path: str) -> None:
        """Copy a local BERT's weights in; cross-attention (and a missing MLM head) stay random.
        A text-only encoder takes the first ``text_layers`` layers and leaves the rest."""
        source = BertForMaskedLM.from_pretrained(path)
        own = self.state_dict()
        state = {k.removeprefix("bert."): v for k, v in source.state_dict().items()}
        if self.cls is None:
            state = {k: v for k, v in state.items() if k in own}
        result = self.load_state_dict(state, strict=False)
        unexpected = [k for k in result.unexpected_keys if not k.startswith("pooler.")]
        if unexpected:
            raise ValueError(f"text.pretrained={path}: unexpected weights {unexpected[:5]}")
        missing = [k for k in result.missing_keys if ".crossattention." not in k]
        if missing:
            log.warning("text.pretrained=%s: %d weights not in the checkpoint (random): %s", path, len(missing), missing[:5])
        if self.cls is not None:
            self.cls.predictions.decoder.weight = self.embeddings.word_embeddings.weight

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _layers(self, hidden, start, stop, self_bias, image_embeds=None, image_bias=None):
        for layer in self.encoder.layer[start:stop]:
            kwargs = dict(encoder_hidden_states=image_embeds, encoder_attention_mask=image_bias)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                hidden = torch.utils.checkpoint.checkpoint(layer, hidden, self_bias, use_reentrant=False, **kwargs)
            else:
                hidden = layer(hidden, self_bias, **kwargs)
        return hidden

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only layers. ``input_ids``, ``attention_mask``: ``[B, L]`` -> ``[B, L, D]``."""
        hidden = self.embeddings(input_ids=input_ids)
        return self._layers(hidden, 0, self.text_layers, padding_bias(attention_mask, hidden.dtype))

    def fuse(
        self,
        text_hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        causal: bool = False,
    ) -> torch.Tensor:
        """Fusion layers: ``[B, L, D]`` text states attend to ``[B, N, D]`` image tokens -> ``[B, L, D]``.

        ``causal=True`` makes the self-attention causal (a decoder sharing these weights).
        """
        bias = (causal_bias if causal else padding_bias)(attention_mask, text_hidden.dtype)
        image_embeds = image_embeds.to(text_hidden.dtype)
        return self._layers(text_hidden, self.text_layers, len(self.encoder.layer), bias, image_embeds)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` -> ``[B, L, vocab]``."""
        return self.cls(hidden)
