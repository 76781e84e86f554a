"""BERT text encoder, fusion encoder and MLM head built from transformers modules.

ALBEF splits one BERT: the first ``text_layers`` layers encode text alone; the remaining layers
add cross-attention to the image tokens (fusion). Module names mirror transformers' BERT
(``embeddings``, ``encoder.layer.N``, ``cls.predictions``) so a local ``bert-base-uncased``
directory loads straight in; only the cross-attention weights start from random, as in ALBEF.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from transformers import BertConfig, BertForMaskedLM, BertTokenizer
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertOnlyMLMHead

from pipeline.models.layers import bert_config, bert_init, checkpointed, grow_rows
from pipeline.models.weights import check_key_account
from pipeline.tokens import budget, textprune


TINY_TOKENIZER = str(Path(__file__).resolve().parent.parent / "configs" / "tiny_tokenizer")


@dataclass
class TextPruneConfig:
    """``text.prune``: the text-token pruning ablation (ELIP's Table 4), off by default.

    ``strategy``: ``none | random | post | learned`` (see :mod:`pipeline.tokens.textprune`);
    ``ratio``: share of the tokens after [CLS] dropped; ``layer``: the text layer they are
    dropped before (default: the first of the second half of the text-only layers). Applied
    in training only: evaluation and captioning encode whole captions.
    """

    strategy: str = "none"
    ratio: float = 0.4
    layer: int | None = None


@dataclass
class TextConfig:
    """The ``text`` section of a backbone config.

    ``pretrained``: a local BERT directory (``config.json`` + weights, e.g. bert-base-uncased);
    ``None`` builds a random BERT from ``bert`` (BertConfig keys; tiny test models).
    ``tokenizer``: a local tokenizer directory; default: ``pretrained``, else the shipped tiny
    vocabulary. ``text_layers``: the layers that encode text alone (ALBEF: 6 of 12, the rest
    fuse; BLIP and METER: all of them). ``prune``: the text-token pruning ablation.
    """

    pretrained: str | None = None
    tokenizer: str | None = None
    bert: dict = field(default_factory=dict)
    text_layers: int = 6
    max_tokens: int = 30
    prune: TextPruneConfig = field(default_factory=TextPruneConfig)


def load_tokenizer(cfg: TextConfig) -> BertTokenizer:
    path = cfg.tokenizer or cfg.pretrained or TINY_TOKENIZER
    if not Path(path).is_dir():
        raise FileNotFoundError(f"text.tokenizer: {path} is not a directory with a vocab.txt")
    return BertTokenizer.from_pretrained(path)


def tokenize(tokenizer, texts: list[str], max_tokens: int, device: torch.device):
    """Captions -> padded ``input_ids`` / ``attention_mask`` ``[B, L]`` on ``device``, at most ``max_tokens``."""
    return tokenizer(texts, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt").to(device)


def _bert_config(cfg: TextConfig, vocab_size: int) -> BertConfig:
    config = bert_config(cfg.pretrained, {} if cfg.pretrained else cfg.bert, "text")  # text.bert: random only
    # a tokenizer with added special tokens (BLIP's [DEC], [ENC]) grows a checkpoint's vocabulary
    config.vocab_size = vocab_size if cfg.pretrained is None else max(config.vocab_size, vocab_size)
    if not 0 <= cfg.text_layers <= config.num_hidden_layers:
        raise ValueError(
            f"text.text_layers={cfg.text_layers} must be within 0..{config.num_hidden_layers} (BERT depth)"
        )
    config._attn_implementation = "sdpa"
    return config


def check_prune(cfg: TextPruneConfig, text_layers: int) -> int | None:
    """The text layer pruned before (None when pruning is off); errors name ``text.prune`` keys."""
    if cfg.strategy not in textprune.STRATEGIES:
        raise ValueError(f"text.prune.strategy={cfg.strategy!r}; expected one of {textprune.STRATEGIES}")
    if cfg.strategy == "none":
        return None
    if not 0.0 < cfg.ratio < 1.0:
        raise ValueError(f"text.prune.ratio={cfg.ratio} must be in (0, 1)")
    layer = text_layers // 2 if cfg.layer is None else cfg.layer
    if not 1 <= layer < text_layers:
        raise ValueError(f"text.prune.layer={layer} must be within 1..{text_layers - 1} (the text-only layers)")
    return layer


class TextOutput(NamedTuple):
    """A text encoder's output (a named tuple, so that ZeRO-3 sees its tensors).

    hidden: ``[B, L', D]``; mask: ``[B, L']``; index: ``[B, L']`` positions kept from the input
    sequence (``None`` when nothing was pruned); tokens_per_layer: sequence length entering each layer.
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    index: torch.Tensor | None
    tokens_per_layer: list[int]


def cls_query_attention(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention of one extra query row over a BERT/RoBERTa layer's tokens.

    ``query`` (the image [CLS], ``[B, D]``) goes through the layer's own query projection and
    attends to the keys of ``hidden [B, L, D]`` (padding masked by ``mask [B, L]``).
    Returns ``[B, L-1]`` over the tokens after [CLS].
    """
    sa = layer.attention.self
    B, L, _ = hidden.shape
    heads, size = sa.num_attention_heads, sa.attention_head_size
    q = sa.query(query.to(hidden.dtype)).view(B, heads, 1, size)
    k = sa.key(hidden).view(B, L, heads, size).transpose(1, 2)
    logits = (q @ k.transpose(-2, -1)) * sa.scaling + padding_bias(mask, q.dtype)
    return logits.float().softmax(dim=-1).mean(dim=1)[:, 0, 1:]


def run_layers(
    layers,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    *,
    prune: TextPruneConfig | None = None,
    prune_at: int | None = None,
    image_cls: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
    checkpointing: bool = False,
) -> TextOutput:
    """Run BERT-style layers over ``hidden [B, L, D]``, pruning text tokens before layer ``prune_at``.

    Args:
        layers: the layers (``layer(hidden, bias, encoder_hidden_states=...)``).
        prune, prune_at: the pruning config and the position in ``layers`` it acts at (None: never).
        image_cls: ``[B, D]`` the image [CLS] (strategy ``learned``).
        index: ``[B, K]`` a kept index from an earlier pass of the same captions: reused
            instead of choosing again (a momentum encoder, a masked copy, a second stream).
        image_embeds: ``[B, N, D]`` image tokens for layers with cross-attention, or None.
    """
    lengths = []
    image_bias = image_key_bias(image_embeds, hidden.dtype)
    for i, layer in enumerate(layers):
        if prune_at is not None and i == prune_at and prune is not None and prune.strategy != "none":
            if index is None:
                attention = None
                if prune.strategy == "learned":
                    if image_cls is None:
                        raise ValueError("text.prune.strategy=learned needs the image [CLS]")
                    attention = cls_query_attention(layer, hidden, mask, image_cls)
                scores = textprune.prune_scores(prune.strategy, mask, attention)
                hidden, mask, index = textprune.select(hidden, mask, scores, textprune.num_kept(hidden.shape[1], prune.ratio))
            else:
                hidden, mask = textprune.gather(hidden, mask, index)
        lengths.append(hidden.shape[1])
        bias = padding_bias(mask, hidden.dtype)
        hidden = checkpointed(checkpointing, layer, hidden, bias, encoder_hidden_states=image_embeds,
                              encoder_attention_mask=image_bias)
    return TextOutput(hidden, mask, index if prune_at is not None else None, lengths)


class _Encoder(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, L]`` 1/0 mask -> ``[B, 1, 1, L]`` additive bias (0 keep, -inf-ish drop)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def image_key_bias(image_embeds: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Cross-attention bias ``[B, 1, 1, N]`` hiding the padding of an adaptive-budget batch
    (exact zero rows, :func:`pipeline.tokens.budget.real_tokens`); None when there is none."""
    real = None if image_embeds is None else budget.real_tokens(image_embeds)
    return None if real is None else padding_bias(real, dtype)


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

    def __init__(self, cfg: TextConfig, vocab_size: int, cross_attention_from: int | None = None,
                 text_only: bool = False):
        super().__init__()
        self.config = _bert_config(cfg, vocab_size)
        self.text_layers = cfg.text_layers
        # BLIP: every layer has cross-attention (skipped when encoding text alone)
        cross_from = cfg.text_layers if cross_attention_from is None else cross_attention_from
        self.prune, self.prune_at = cfg.prune, check_prune(cfg.prune, cfg.text_layers)
        fusion_config = copy.deepcopy(self.config)
        fusion_config.is_decoder, fusion_config.add_cross_attention = True, True
        # text_only: a dual encoder (CLIP) has no fusion layers and no MLM head; its weights keep
        # the same names, so they load into the first layers of a fusion model.
        depth = cfg.text_layers if text_only else self.config.num_hidden_layers
        layers = [BertLayer(self.config if i < cross_from else fusion_config, layer_idx=i) for i in range(depth)]
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = _Encoder(layers)
        self.cls = None if text_only else BertOnlyMLMHead(self.config)
        self.apply(lambda m: bert_init(m, self.config.initializer_range))
        if self.cls is not None:
            self.cls.predictions.decoder.weight = self.embeddings.word_embeddings.weight  # tied, as in BERT
        if cfg.pretrained is not None:
            self._load_pretrained(cfg.pretrained)

    def _load_pretrained(self, path: str) -> None:
        """Copy a local BERT's weights in, with a full key account
        (:func:`~pipeline.models.weights.check_key_account`). Expected to differ: cross-attention
        (fusion layers, not in BERT), the MLM head when the directory has none (a ``BertModel``),
        BERT's pooler and NSP head; a text-only encoder takes the first ``text_layers`` layers and
        leaves the rest and the MLM head unused. Anything else (a renamed or missing key) is an error."""
        source, info = BertForMaskedLM.from_pretrained(path, output_loading_info=True)
        own = self.state_dict()
        state = {k.removeprefix("bert."): v for k, v in source.state_dict().items()}
        for key, value in state.items():
            # added tokens (BLIP's [DEC], [ENC]): the checkpoint fills the first rows, the rest stay random
            grown = grow_rows(value, own[key]) if key in own else None
            if grown is not None:
                state[key] = grown
        not_in_file = {k.removeprefix("bert.") for k in info["missing_keys"]}  # random in ``source``
        left = [k for k in state if k not in own]
        state = {k: v for k, v in state.items() if k in own and k not in not_in_file}
        result = self.load_state_dict(state, strict=False)
        may_leave = ["pooler.*", "cls.seq_relationship.*", "*position_ids"]
        if self.cls is None:
            may_leave += ["cls.*", *(f"encoder.layer.{i}.*" for i in range(self.text_layers, source.config.num_hidden_layers))]
        check_key_account(f"text.pretrained={path}", sorted(set(result.missing_keys)),
                          [k.removeprefix("bert.") for k in info["unexpected_keys"]] + left,
                          may_miss=["*.crossattention.*", "cls.predictions.*"], may_leave=may_leave)
        if self.cls is not None:
            self.cls.predictions.decoder.weight = self.embeddings.word_embeddings.weight

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _layers(self, hidden, start, stop, self_bias, image_embeds=None):
        image_bias = image_key_bias(image_embeds, hidden.dtype)
        for layer in self.encoder.layer[start:stop]:
            hidden = checkpointed(self.grad_checkpointing and self.training, layer, hidden, self_bias,
                                  encoder_hidden_states=image_embeds, encoder_attention_mask=image_bias)
        return hidden

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only layers. ``input_ids``, ``attention_mask``: ``[B, L]`` -> ``[B, L, D]``."""
        if self.pruning:
            raise RuntimeError("text.prune is on: use encode(), which also returns the pruned mask")
        hidden = self.embeddings(input_ids=input_ids)
        return self._layers(hidden, 0, self.text_layers, padding_bias(attention_mask, hidden.dtype))

    @property
    def pruning(self) -> bool:
        """Whether :meth:`encode` prunes text tokens now (configured, and in training)."""
        return self.prune_at is not None and self.training

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_cls: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> TextOutput:
        """Text-only layers with the configured text-token pruning (training only).

        Args:
            input_ids, attention_mask: ``[B, L]``.
            image_cls: ``[B, D]`` image [CLS] for ``text.prune.strategy: learned``.
            index: a kept index to reuse (see :func:`run_layers`).
        Returns:
            :class:`TextOutput`; without pruning ``hidden`` equals :meth:`encode_text`'s.
        """
        return self.encode_embeds(self.embeddings(input_ids=input_ids), attention_mask, image_cls, index)

    def encode_embeds(self, hidden, attention_mask, image_cls=None, index=None, image_embeds=None) -> TextOutput:
        """:meth:`encode` from the embedding output ``[B, L, D]``; with ``image_embeds`` the
        layers cross-attend to them (BLIP's image-grounded encoder runs every layer)."""
        stop = self.text_layers if image_embeds is None else len(self.encoder.layer)
        if image_embeds is not None:
            image_embeds = image_embeds.to(hidden.dtype)
        return run_layers(
            self.encoder.layer[:stop], hidden, attention_mask, prune=self.prune,
            prune_at=self.prune_at if self.training else None, image_cls=image_cls, index=index,
            image_embeds=image_embeds, checkpointing=self.grad_checkpointing and self.training,
        )

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
