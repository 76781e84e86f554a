"""METER fine-tuned for VQA: a classifier over an answer vocabulary on the pooled fusion output.

As the official METER (``meter_module.py`` ``vqa_classifier``, ``objectives.compute_vqa``): the
concatenated pooled text and image [CLS] (``[B, 2D]``) go through ``Linear(2D, 2D) -> LayerNorm
-> GELU -> Linear(2D, A)``, trained with binary cross-entropy against VQA soft scores (times A,
as METER does after ban-vqa). A question's soft score for an answer is METER's ``get_score`` of
how many of its human answers say it: 0, 0.3, 0.6, 0.9, then 1 from four on
(``write_vqa.py``); answers outside the vocabulary score nothing. The vocabulary
(``model.answers``) is a JSON list of answer strings, METER's ``label2ans`` (for VQAv2: the
3,129 majority answers seen at least 9 times in train+val; ``python -m pipeline.eval.vqa_answers``
builds it from training shards).

The encoders and fusion are :class:`~pipeline.models.meter.MeterEncoders`, METER's own, under
METER's parameter names: ``train.init_from`` a ``meter`` run copies all of them; the head starts
fresh. Evaluation answers by argmax over the vocabulary, so the generation settings of the VQA
evaluation (prompt, beams, lengths) do not apply and are ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models import register_model
from pipeline.models.meter import MeterEncoders, _meter_vision, init_fresh
from pipeline.models.text import TextConfig
from pipeline.models.vit import VitConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def soft_score(count: int) -> float:
    """METER's (``write_vqa.get_score``) soft score of an answer given by ``count`` annotators."""
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def load_answers(path: str) -> list[str]:
    """The answer vocabulary: a JSON list of distinct strings at ``path`` (or, for a bare name, in
    the shipped configs directory). A missing or malformed file is an error naming it."""
    file = Path(path)
    if not file.is_file() and not file.is_absolute() and (CONFIGS / path).is_file():
        file = CONFIGS / path
    if not file.is_file():
        raise FileNotFoundError(f"model.answers={path}: no such file (a JSON list of answers, METER's label2ans)")
    try:
        answers = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model.answers={path}: not a JSON file ({exc})") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"model.answers={path}: expected a non-empty JSON list of answer strings")
    if len(set(answers)) != len(answers):
        raise ValueError(f"model.answers={path}: answers repeat; each must appear once")
    return answers


def soft_targets(human_answers: list[list[str]], index: dict[str, int]) -> torch.Tensor:
    """``[B, A]`` soft scores: for each question, :func:`soft_score` of every vocabulary answer
    among its human answers (METER counts the raw annotation strings)."""
    targets = torch.zeros(len(human_answers), len(index))
    for row, answers in enumerate(human_answers):
        for answer in set(answers):
            if answer in index:
                targets[row, index[answer]] = soft_score(answers.count(answer))
    return targets


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """METER's VQA loss: mean binary cross-entropy over ``[B, A]`` logits and soft targets, times A."""
    return F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]


@dataclass
class MeterVqaConfig:
    """``model:`` section for ``name: meter_vqa``: METER's encoders (see ``MeterConfig``), the
    answer vocabulary ``answers`` and METER's VQA learning-rate multipliers (head 50x, cross-modal 5x)."""

    name: str = "meter_vqa"
    vision: VitConfig = field(default_factory=_meter_vision)
    text: TextConfig = field(default_factory=lambda: TextConfig(text_layers=12, max_tokens=50))
    fusion_layers: int = 6
    answers: str = "vqav2_answers.json"
    lr_mult_cross_modal: float = 5.0
    lr_mult_head: float = 50.0


class MeterVQA(MeterEncoders):
    """``forward(batch) -> dict(loss, loss_vqa, tokens_per_layer, kept_patches)`` with the human
    answers from each sample's ``KEY.json`` (``batch["meta"][i]["answers"]``, data_prep's VQA
    schema); ``answer_questions(images, questions) -> B answers`` (a :class:`VqaAnswerer`)."""

    vqa_defaults: dict = {}  # no generation: the answer is the vocabulary's argmax

    def __init__(self, cfg: MeterVqaConfig):
        super().__init__(cfg)
        self.answers = load_answers(cfg.answers)
        self.answer_index = {a: i for i, a in enumerate(self.answers)}
        hs = 2 * self.width
        self.vqa_classifier = nn.Sequential(nn.Linear(hs, hs), nn.LayerNorm(hs), nn.GELU(),
                                            nn.Linear(hs, len(self.answers)))
        init_fresh(self.vqa_classifier, self.width)

    def lr_scales(self) -> dict[str, float]:
        return super().lr_scales() | {"vqa_classifier.": self.cfg.lr_mult_head}

    def _logits(self, images: torch.Tensor, questions: list[str]):
        """``[B, 3, H, W]`` images and B questions -> (``[B, A]`` logits, the ViT's output)."""
        enc = self.tokenize(questions, images.device)
        _, vision, _, cls_feats = self.infer(enc.input_ids, enc.attention_mask, images)
        return self.vqa_classifier(cls_feats), vision

    def forward(self, batch: dict) -> dict:
        """Soft-score BCE. ``batch``: ``image`` ``[B, 3, H, W]``, ``text`` B questions, ``meta`` B
        ``KEY.json`` dicts with ``answers`` (a sample without them is named)."""
        metas = batch["meta"]
        bad = [m.get("question_id", i) for i, m in enumerate(metas)
               if not isinstance(m.get("answers"), list) or not m["answers"]]
        if bad:
            raise ValueError(f"questions {bad[:3]}: KEY.json has no human answers (VQA training shards: "
                             "python -m data_prep vqav2 / okvqa / synthetic_vqa with annotations)")
        logits, vision = self._logits(batch["image"], batch["text"])
        targets = soft_targets([m["answers"] for m in metas], self.answer_index).to(logits.device)
        loss = vqa_loss(logits.float(), targets)
        return {"loss": loss, "loss_vqa": loss.detach(), "tokens_per_layer": vision.tokens_per_layer,
                "kept_patches": vision.kept_patches}

    @torch.no_grad()
    def answer_questions(self, images: torch.Tensor, questions: list[str], **generation) -> list[str]:
        """B answers: each question's highest-scoring vocabulary answer (``generation``, the VQA
        evaluation's prompt and beam settings, does not apply to a classifier)."""
        logits, _ = self._logits(images, questions)
        return [self.answers[i] for i in logits.argmax(dim=-1).tolist()]


register_model("meter_vqa", MeterVqaConfig, MeterVQA, eval_task="vqa")
