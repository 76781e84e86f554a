"""Connectors from frozen-ViT tokens to an LLM's soft prompts: EVLGen's TomeFormer and the
BLIP-2 Q-Former baseline.

Both map ``[B, N, D_vision]`` visual tokens to ``[B, P, H]`` connector states (``H`` = BERT
width, 768 for BERT-base); the model projects those to the LLM width.

- :class:`TomeFormer` (EVLGen): a BERT encoder fed with ``Linear(D_vision -> H)`` of the visual
  tokens as ``inputs_embeds`` (position and token-type embeddings and the embedding LayerNorm
  apply, word embeddings do not exist). Self-attention only; after each layer's attention
  output, ``r`` tokens are merged by ToMe's bipartite soft matching, so 257 tokens become 29 with
  r = 19 over 12 layers. The layer's own modules (same state-dict names as transformers' BERT,
  so a local ``bert-base-uncased`` loads in) are re-sequenced here, the way ``vit.py`` does
  with timm blocks, to get the keys for matching and the merge point between attention and FFN.
- :class:`QFormerConnector` (BLIP-2): ``num_queries`` learned queries through transformers'
  ``Blip2QFormerModel``, cross-attending to the visual tokens every ``cross_attention_freq``
  layers; optionally initialised from a local BERT the way BLIP-2 does it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertModel
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer

from pipeline.models.layers import bert_config, bert_init, checkpointed
from pipeline.models.weights import check_key_account
from pipeline.tokens import tome



@dataclass
class TomeFormerConfig:
    """``model.tomeformer``: ``pretrained`` a local BERT directory (``bert-base-uncased``) or
    ``None`` for a random BERT from ``bert`` (BertConfig keys); ``r`` tokens merged per layer (an
    int shaped by ``inflect``, or a per-layer list); ``merge``: ``mean`` averages merged tokens
    (EVLGen's official code), ``weighted`` is ToMe's size-weighted average with proportional
    attention (``+log(size)`` on the keys)."""

    pretrained: str | None = None
    bert: dict = field(default_factory=dict)
    r: int | list[int] = 19
    inflect: float = 0.0
    merge: Literal["mean", "weighted"] = "mean"


@dataclass
class QFormerConfig:
    """``model.qformer``: BLIP-2's Q-Former. ``pretrained``: a local BERT directory whose
    self-attention and FFN weights initialise the Q-Former (cross-attention stays random), as
    BLIP-2 does; ``None``: random from ``bert`` (BertConfig-style keys)."""

    num_queries: int = 32
    cross_attention_freq: int = 2
    pretrained: str | None = None
    bert: dict = field(default_factory=dict)


def _bert_state(path: str, key: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A local BERT's weights with BertModel's names (``embeddings.*``, ``encoder.layer.N.*``) and
    the file's keys BertModel does not use. A BertModel weight the file lacks (a renamed or
    missing key: transformers would leave it random) is an error naming ``key=path``."""
    model, info = BertModel.from_pretrained(path, output_loading_info=True)
    check_key_account(f"{key}={path}", info["missing_keys"], [], may_miss=["pooler.*"])
    state = {k.removeprefix("bert."): v for k, v in model.state_dict().items()}
    return state, [k.removeprefix("bert.") for k in info["unexpected_keys"]]


class TomeFormer(nn.Module):
    """BERT layers that merge tokens after every attention (see the module docstring).

    Attributes:
        width: hidden size ``H``. schedule: tokens merged in each layer.
    """

    def __init__(self, cfg: TomeFormerConfig, vision_width: int, class_token: bool = True):
        super().__init__()
        self.cfg = cfg
        self.config = bert_config(cfg.pretrained, cfg.bert, "model.tomeformer")
        self.width = self.config.hidden_size
        self.num_heads = self.config.num_attention_heads
        self.class_token = class_token
        self.weighted = cfg.merge == "weighted"
        self.input_proj = nn.Linear(vision_width, self.width)
        self.embeddings = BertEmbeddings(self.config)
        del self.embeddings.word_embeddings  # fed with inputs_embeds only: no vocabulary to keep
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(self.config, layer_idx=i)
                                           for i in range(self.config.num_hidden_layers))
        self.apply(lambda m: bert_init(m, self.config.initializer_range))
        self.schedule = tome.r_schedule(self.config.num_hidden_layers, cfg.r, cfg.inflect)
        self.grad_checkpointing = False
        if cfg.pretrained is not None:
            self._load_pretrained(cfg.pretrained)

    def _load_pretrained(self, path: str) -> None:
        """BERT's layers and position embeddings; its vocabulary, pooler and heads go unused
        (the TomeFormer reads projected vision tokens), ``input_proj`` starts fresh."""
        state, file_unused = _bert_state(path, "model.tomeformer.pretrained")
        result = self.load_state_dict(state, strict=False)
        check_key_account(f"model.tomeformer.pretrained={path}", result.missing_keys,
                          [*result.unexpected_keys, *file_unused], may_miss=["input_proj.*"],
                          may_leave=["pooler.*", "embeddings.word_embeddings.*", "cls.*", "*position_ids"])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def output_tokens(self, num_tokens: int) -> list[int]:
        """Sequence length entering each layer, then the output length, for ``num_tokens`` inputs."""
        lengths = [num_tokens]
        protected = int(self.class_token)
        for r in self.schedule:
            n = lengths[-1]
            lengths.append(n - min(r, (n - protected) // 2))
        return lengths

    def _layer(self, i: int, h: torch.Tensor, size: torch.Tensor | None):
        """One BERT layer with a merge between attention and FFN.

        Args:
            h: ``[B, N, H]``; size: ``[B, N, 1]`` patches per token (None = all ones).
        Returns:
            ``(h [B, N - r_i, H], size [B, N - r_i, 1] | None)``.
        """
        layer = self.encoder.layer[i]
        sa = layer.attention.self
        B, N, _ = h.shape
        q, k, v = (proj(h).view(B, N, self.num_heads, -1).transpose(1, 2) for proj in (sa.query, sa.key, sa.value))
        bias = tome.proportional_attention_bias(size) if self.weighted else None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                           dropout_p=sa.dropout.p if self.training else 0.0)
        a = layer.attention.output(o.transpose(1, 2).reshape(B, N, self.width), h)  # dense + residual + LN
        r = self.schedule[i]
        if r > 0:
            merge, _ = tome.bipartite_soft_matching(k.mean(dim=1), r, class_token=self.class_token)
            a, size = (tome.merge_wavg if self.weighted else tome.merge_mean)(merge, a, size)
        return layer.output(layer.intermediate(a), a), size

    def forward(self, vision_tokens: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """``[B, N, D_vision]`` -> ``([B, N', H], tokens entering each layer + the output count)``."""
        h = self.embeddings(inputs_embeds=self.input_proj(vision_tokens))
        size, lengths = None, []
        for i in range(len(self.encoder.layer)):
            lengths.append(h.shape[1])
            h, size = checkpointed(self.grad_checkpointing and self.training, self._layer, i, h, size)
        lengths.append(h.shape[1])
        return h, lengths


# BERT name -> Q-Former name, as BLIP-2 initialises its Q-Former from bert-base-uncased
# (the query FFN "*_query" copies BERT's FFN).
_QFORMER_FROM_BERT = (
    ("embeddings.LayerNorm.", "layernorm."),
    (".attention.self.", ".attention.attention."),
    (".intermediate.", ".intermediate_query."),
    (".output.", ".output_query."),
)


def qformer_state_from_bert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BertModel weights renamed for ``Blip2QFormerModel`` (only the parts it has)."""
    out = {}
    for key, value in state.items():
        if key.startswith("encoder.layer."):
            parts = key.split(".")
            # encoder.layer.N.attention.output.* stays; encoder.layer.N.output.* -> output_query
            rest = "." + ".".join(parts[3:])
            for old, new in _QFORMER_FROM_BERT[1:]:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[".".join(parts[:3]) + rest] = value
        elif key.startswith(_QFORMER_FROM_BERT[0][0]):
            out[_QFORMER_FROM_BERT[0][1] + key[len(_QFORMER_FROM_BERT[0][0]):]] = value
    return out


class QFormerConnector(nn.Module):
    """BLIP-2's Q-Former: ``[B, N, D_vision]`` -> ``[B, num_queries, H]``."""

    def __init__(self, cfg: QFormerConfig, vision_width: int):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        base = bert_config(cfg.pretrained, cfg.bert, "model.qformer")
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                "initializer_range", "layer_norm_eps")
        config = Blip2QFormerConfig(**{k: getattr(base, k) for k in keys}, encoder_hidden_size=vision_width,
                                    cross_attention_frequency=cfg.cross_attention_freq)
        config._attn_implementation = "sdpa"
        self.width = config.hidden_size
        self.num_layers = config.num_hidden_layers
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_queries, self.width))
        nn.init.normal_(self.query_tokens, std=config.initializer_range)
        self.qformer = Blip2QFormerModel(config)
        if cfg.pretrained is not None:
            result = self.qformer.load_state_dict(qformer_state_from_bert(_bert_state(cfg.pretrained, "model.qformer.pretrained")[0]), strict=False)
            if result.unexpected_keys:
                raise ValueError(f"model.qformer.pretrained={cfg.pretrained}: unexpected weights "
                                 f"{result.unexpected_keys[:5]}")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.qformer.gradient_checkpointing_enable() if enable else self.qformer.gradient_checkpointing_disable()

    def output_tokens(self, num_tokens: int) -> list[int]:
        return [self.query_tokens.shape[1]] * (self.num_layers + 1)

    def forward(self, vision_tokens: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """``[B, N, D_vision]`` -> ``([B, Q, H], [Q] * (layers + 1))``."""
        queries = self.query_tokens.expand(vision_tokens.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=vision_tokens).last_hidden_state
        return out, self.output_tokens(vision_tokens.shape[1])
