"""The answer decoder of ALBEF's and BLIP's VQA models: a BERT LM whose layers attend causally to
the answer so far and cross-attend to the question states the fusion encoder made of the image
and question; plus the pieces both heads share (answer weights, the weighted LM loss, ALBEF's
ranking of a candidate list, BLIP's generation).

Layer names follow transformers' BERT (``embeddings``, ``encoder.layer.N`` with ``attention``,
``crossattention``, ``intermediate``, ``output``, and ``cls.predictions``), so a pre-training
run's fusion or decoder layers map onto them by prefix (``init_from_renames``).
"""
from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertOnlyMLMHead

from pipeline.models.layers import bert_init
from pipeline.models.text import causal_bias, padding_bias


class _Layers(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class AnswerDecoder(nn.Module):
    """``num_layers`` BERT layers (causal self-attention, cross-attention to question states, FFN)
    between BERT embeddings and an LM head tied to the word embeddings."""

    def __init__(self, config: BertConfig, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"the answer decoder needs at least one layer, got {num_layers}")
        config = copy.deepcopy(config)
        config.is_decoder, config.add_cross_attention = True, True
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = _Layers([BertLayer(config, layer_idx=i) for i in range(num_layers)])
        self.cls = BertOnlyMLMHead(config)
        self.apply(lambda m: bert_init(m, config.initializer_range))
        self.cls.predictions.decoder.weight = self.embeddings.word_embeddings.weight

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, states: torch.Tensor,
                states_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits.

        Args:
            ids, mask: ``[B, L]`` answer tokens (BOS first) and their padding mask.
            states, states_mask: ``[B, Lq, D]`` question states and their ``[B, Lq]`` mask.
        Returns:
            ``[B, L, V]``.
        """
        hidden = self.embeddings(input_ids=ids)
        self_bias = causal_bias(mask, hidden.dtype)
        cross_bias = padding_bias(states_mask, hidden.dtype)
        states = states.to(hidden.dtype)
        for layer in self.encoder.layer:
            hidden = layer(hidden, self_bias, encoder_hidden_states=states, encoder_attention_mask=cross_bias)
        return self.cls(hidden)

    def sequence_nll(self, ids, mask, states, states_mask, label_smoothing: float = 0.0) -> torch.Tensor:
        """``[B]`` negative log-likelihood of each answer after its BOS, summed over its tokens
        (ALBEF's and BLIP's ``reduction='none'``); padding counts nothing."""
        logits = self(ids, mask, states, states_mask)[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none",
                              label_smoothing=label_smoothing)
        return nll.sum(1)


def answer_weights(answers: list[str]) -> tuple[list[str], list[float]]:
    """A question's distinct human answers and ALBEF's weight of each, its share of the answers:
    ``["two"] * 7 + ["three"] * 3`` -> ``(["two", "three"], [0.7, 0.3])`` (first-seen order)."""
    counts = Counter(answers)
    return list(counts), [n / len(answers) for n in counts.values()]


def targets_from_meta(metas: list[dict]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The distinct answers of a batch's questions (their ``KEY.json`` ``answers``), flattened,
    with ``[A]`` weights and ``[B]`` answer counts; a question without answers is named."""
    bad = [m.get("question_id", i) for i, m in enumerate(metas)
           if not (isinstance(m.get("answers"), list) and m["answers"] and all(isinstance(a, str) for a in m["answers"]))]
    if bad:
        raise ValueError(f"questions {bad[:3]}: KEY.json has no 'answers' (a non-empty list of strings) to train on; "
                         "test-dev shards have none (VQA shards: python -m data_prep vqav2 / synthetic_vqa)")
    texts, weights, counts = [], [], []
    for m in metas:
        distinct, w = answer_weights([a.strip().lower() for a in m["answers"]])
        texts += distinct
        weights += w
        counts.append(len(distinct))
    return texts, torch.tensor(weights), torch.tensor(counts)


def weighted_answer_loss(decoder: AnswerDecoder, answer_ids: torch.Tensor, answer_mask: torch.Tensor,
                         weights: torch.Tensor, counts: torch.Tensor, states: torch.Tensor,
                         states_mask: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """ALBEF's / BLIP's VQA loss: each question's states repeated for each of its answers, the
    answers' summed token NLL weighted, summed and divided by the number of questions.

    Args:
        answer_ids, answer_mask: ``[A, L]`` the answers (BOS first); weights: ``[A]``;
        counts: ``[B]`` answers per question (summing to A); states, states_mask: ``[B, Lq, D]``, ``[B, Lq]``.
    """
    counts = counts.to(states.device)
    nll = decoder.sequence_nll(answer_ids, answer_mask, states.repeat_interleave(counts, 0),
                               states_mask.repeat_interleave(counts, 0), label_smoothing)
    return (weights.to(nll.device) * nll).sum() / states.shape[0]


@torch.no_grad()
def rank_answers(decoder: AnswerDecoder, states: torch.Tensor, states_mask: torch.Tensor,
                 answer_ids: torch.Tensor, answer_mask: torch.Tensor, k: int) -> torch.Tensor:
    """ALBEF's ``rank_answer``: the ``k`` candidates whose first token the decoder finds likeliest
    after BOS, re-ranked by their whole answer's log-likelihood.

    Args:
        states, states_mask: ``[B, Lq, D]``, ``[B, Lq]`` question states.
        answer_ids, answer_mask: ``[N, L]`` the candidate answers (BOS first, every one the same BOS).
        k: candidates re-ranked per question (at most N).
    Returns:
        ``[B]`` the index of each question's best candidate.
    """
    B, k = states.shape[0], min(k, answer_ids.shape[0])
    bos = answer_ids[:1, :1].expand(B, 1)
    first = decoder(bos, torch.ones_like(bos), states, states_mask)[:, 0].float().softmax(-1)  # [B, V]
    topk = first.index_select(1, answer_ids[:, 1]).topk(k, dim=1).indices  # [B, k]
    ids, mask = answer_ids[topk.flatten()], answer_mask[topk.flatten()]
    nll = decoder.sequence_nll(ids, mask, states.repeat_interleave(k, 0), states_mask.repeat_interleave(k, 0))
    best = (-nll).view(B, k).argmax(1)
    return topk.gather(1, best[:, None])[:, 0]
