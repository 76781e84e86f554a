"""ALBEF fine-tuned for VQA (salesforce/ALBEF ``models/model_vqa.py``, ``VQA.py``): the fused
image-question states feed an answer decoder that ranks a candidate answer list.

What follows ALBEF: the (ELIP-pruned, question-guided) ViT and the text + fusion BERT encode
image and question; the answer decoder is a BERT LM head whose layers have causal
self-attention and cross-attention to the fused question states, as many as the fusion layers
(ALBEF: 6) and initialised from them, with the text encoder's embeddings and MLM head (ALBEF's
``VQA.py`` checkpoint mapping; here ``init_from_renames``, and a copy at build time). Training
loss: the decoder's summed token NLL of each of a question's distinct human answers, weighted by
the answer's share of them (ALBEF's ``weights``: 7 of 10 -> 0.7), summed and divided by the
batch size. Evaluation (``rank_answer``): the ``k_test`` candidates (ALBEF: 128) with the
likeliest first token after [CLS], re-ranked by their answer likelihood; the candidates are
``model.answers.file`` (a JSON list, ALBEF's ``answer_list.json``) or the ``top`` most frequent
answers of the training shards, which :mod:`pipeline.eval.vqa` reads.

Where this differs: no momentum distillation (ALBEF's VQA recipe distils from a momentum copy,
alpha 0.4); an answer is tokenized ``[CLS] answer [SEP]`` (ALBEF appends its ``eos`` "[SEP]"
to the text as well, so its answers end in two); the re-ranking score is the answer's
log-likelihood with its first token counted once (ALBEF adds the first token's log-probability
again); no VG-QA weight 0.5 (it comes with VG shards, which data_prep does not make for VQA).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from pipeline.models import register_model
from pipeline.models.albef import add_encoders
from pipeline.models.answer_decoder import AnswerDecoder, rank_answers, targets_from_meta, weighted_answer_loss
from pipeline.models.pairing import encode_pair
from pipeline.models.text import TextConfig, tokenize
from pipeline.models.vit import VitConfig


@dataclass
class AnswerListConfig:
    """``model.answers``: the candidates ALBEF ranks. ``file``: a JSON list of answer strings
    (ALBEF's ``answer_list.json``); null: the ``top`` most frequent answers of ``data.train_shards``."""

    file: str | None = None
    top: int = 3128

    def __post_init__(self):
        if self.top < 1:
            raise ValueError(f"model.answers.top={self.top} must be >= 1")


@dataclass
class AlbefVqaConfig:
    """``model:`` section for ``name: albef_vqa`` (ALBEF's ViT-B/16 at 384 px + BERT-base)."""

    name: str = "albef_vqa"
    vision: VitConfig = field(default_factory=lambda: VitConfig(image_size=384))
    text: TextConfig = field(default_factory=TextConfig)
    k_test: int = 128
    answers: AnswerListConfig = field(default_factory=AnswerListConfig)

    def __post_init__(self):
        if self.k_test < 1:
            raise ValueError(f"model.k_test={self.k_test} must be >= 1")


class AlbefVQA(nn.Module):
    """``forward(batch) -> dict(loss, loss_vqa, tokens_per_layer, kept_patches)`` with the
    answers from each sample's ``KEY.json`` (``batch["meta"]``); ``answer_questions(images,
    questions, k_test=...)`` ranks the candidates given by ``set_answer_candidates``."""

    def __init__(self, cfg: AlbefVqaConfig):
        super().__init__()
        self.cfg = cfg
        add_encoders(self, cfg)
        enc = self.text_encoder
        first_fusion = enc.text_layers
        self.text_decoder = AnswerDecoder(enc.config, len(enc.encoder.layer) - first_fusion)
        renames = {"text_encoder.embeddings.": ["text_encoder.embeddings.", "text_decoder.embeddings."],
                   "text_encoder.cls.": ["text_encoder.cls.", "text_decoder.cls."]}
        for j in range(len(self.text_decoder.encoder.layer)):
            own = f"text_encoder.encoder.layer.{first_fusion + j}."
            renames[own] = [own, f"text_decoder.encoder.layer.{j}."]
        self.init_from_renames = renames
        dec = self.text_decoder  # the same copy at build time (a text.pretrained BERT, or random)
        dec.embeddings.load_state_dict(enc.embeddings.state_dict())
        for j, layer in enumerate(dec.encoder.layer):
            layer.load_state_dict(enc.encoder.layer[first_fusion + j].state_dict())
        dec.cls.load_state_dict(enc.cls.state_dict())
        self.candidates: list[str] | None = None
        self._candidate_tokens = None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)

    def _question_states(self, images: torch.Tensor, questions: list[str]):
        """``[B, 3, H, W]`` images, B questions -> (states ``[B, L, D]``, mask ``[B, L]``, the ViT's output)."""
        tok = tokenize(self.tokenizer, questions, self.cfg.text.max_tokens, images.device)
        text, vision = encode_pair(self.visual_encoder, self.text_encoder.encode, images, tok.input_ids,
                                   tok.attention_mask, self.image_first)
        return self.text_encoder.fuse(text.hidden, text.mask, vision.tokens), text.mask, vision

    def _answers(self, texts: list[str], device):
        """``[CLS] answer [SEP]`` ids and mask ``[A, L]`` ([CLS] is ALBEF's answer BOS)."""
        return tokenize(self.tokenizer, texts, self.cfg.text.max_tokens, device)

    def forward(self, batch: dict) -> dict:
        """The weighted answer LM loss. ``batch``: ``image`` ``[B, 3, H, W]``, ``text`` B
        questions, ``meta`` B ``KEY.json`` dicts with ``answers``."""
        states, mask, vision = self._question_states(batch["image"], batch["text"])
        texts, weights, counts = targets_from_meta(batch["meta"])
        ans = self._answers(texts, states.device)
        loss = weighted_answer_loss(self.text_decoder, ans.input_ids, ans.attention_mask, weights, counts,
                                    states, mask)
        return {"loss": loss, "loss_vqa": loss.detach(), "tokens_per_layer": vision.tokens_per_layer,
                "kept_patches": vision.kept_patches}

    # -- evaluation ----------------------------------------------------------------------------
    @property
    def vqa_defaults(self) -> dict:
        """:meth:`answer_questions`' settings: ``k_test``, the candidates re-ranked (``model.k_test``)."""
        return {"k_test": self.cfg.k_test}

    @property
    def answer_source(self) -> dict:
        """Where the candidates come from (``model.answers``): ``{"file", "top"}``."""
        return {"file": self.cfg.answers.file, "top": self.cfg.answers.top}

    def set_answer_candidates(self, answers: list[str]) -> None:
        """The list :meth:`answer_questions` ranks (ALBEF's ``answer_list``)."""
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise ValueError("the VQA candidate answers must be a non-empty list of non-empty strings")
        self.candidates = list(answers)
        self._candidate_tokens = None

    @torch.no_grad()
    def answer_questions(self, images: torch.Tensor, questions: list[str], *, k_test: int) -> list[str]:
        """The best of the candidates for each question (ALBEF's ``rank_answer``).

        Args:
            images: ``[B, 3, H, W]``; questions: B strings; k_test: candidates re-ranked by their
                whole answer's likelihood after the first-token shortlist.
        Returns:
            B answers, each one of the candidates.
        """
        if self.candidates is None:
            raise RuntimeError("albef_vqa: no candidate answers; set_answer_candidates first (pipeline.eval.vqa does)")
        if len(questions) != images.shape[0] or k_test < 1:
            raise ValueError(f"answer_questions: {images.shape[0]} images, {len(questions)} questions, k_test={k_test}")
        states, mask, _ = self._question_states(images, questions)
        if self._candidate_tokens is None or self._candidate_tokens.input_ids.device != states.device:
            self._candidate_tokens = self._answers(self.candidates, states.device)
        tok = self._candidate_tokens
        best = rank_answers(self.text_decoder, states, mask, tok.input_ids, tok.attention_mask, k_test)
        return [self.candidates[i] for i in best.tolist()]


register_model("albef_vqa", AlbefVqaConfig, AlbefVQA, eval_task="vqa")
