"""What a model offers the code around it, declared as small protocols.

A model is an ``nn.Module`` whose ``forward(batch) -> dict`` (see :mod:`pipeline.models`) is
all training needs; everything else is optional, and a caller asks for it by protocol
(``isinstance(model, Captioner)``) rather than by probing attribute names. A model provides a
protocol by having its methods; nothing needs to inherit from these classes.
"""
from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainableModel(Protocol):
    """``forward(batch) -> {"loss": scalar, "loss_<part>": scalar..., "tokens_per_layer":
    list[int], "kept_patches": BoolTensor[B, P] | None}``."""

    def forward(self, batch: dict) -> dict: ...


@runtime_checkable
class GradCheckpointing(Protocol):
    """Recomputes its blocks' activations in backward (``train.grad_checkpointing``)."""

    def set_grad_checkpointing(self, enable: bool = True) -> None: ...


@runtime_checkable
class FollowsProgress(Protocol):
    """Has settings scheduled over training (EViT's keep-rate warm-up, FLIP's unmasked tuning):
    the trainer calls ``set_progress(step, total_steps)`` before every optimizer step, on every
    submodule that offers it, and logs the returned ``{name: value}`` as ``reduction/<name>``."""

    def set_progress(self, step: int, total_steps: int) -> dict[str, float]: ...


@runtime_checkable
class PatchModel(Protocol):
    """Sees images as square patches of ``patch_size`` pixels (the kept-patch image grid)."""

    patch_size: int


@runtime_checkable
class RetrievalModel(Protocol):
    """Embeds images and captions for zero-shot retrieval (:mod:`pipeline.eval.retrieval`).

    ``image_features(images [B, 3, H, W]) -> (embeds [B, N, D], feats [B, E] | None)``;
    ``text_features(texts, device) -> (embeds [B, L, D], mask [B, L], feats [B, E] | None)``;
    ``feats`` are the normalised ITC features, None for a model without ITC (METER).
    """

    def image_features(self, images: torch.Tensor) -> tuple: ...

    def text_features(self, texts: list[str], device: torch.device) -> tuple: ...


@runtime_checkable
class ItmScorer(Protocol):
    """Re-ranks image-caption pairs by image-text matching: ``itm_scores(image_embeds [K, N, D],
    text_embeds [K, L, D], mask [K, L]) -> [K]``. A retrieval model without it (CLIP) is ranked
    by ITC alone."""

    def itm_scores(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Captioner(Protocol):
    """Generates captions (:mod:`pipeline.eval.caption`) from ``[B, 3, H, W]`` images or
    ``[B, T, 3, H, W]`` frames; ``caption_defaults`` holds the four keyword arguments."""

    caption_defaults: dict

    def generate_captions(self, images: torch.Tensor, *, prompt: str, max_new_tokens: int, min_length: int,
                          num_beams: int) -> list[str]: ...


@runtime_checkable
class VqaAnswerer(Protocol):
    """Answers questions about ``[B, 3, H, W]`` images in a few words (:mod:`pipeline.eval.vqa`):
    ``answer_questions(images, questions, **settings) -> B strings``. ``vqa_defaults`` names the
    settings the model takes, with their values: EVLGen's zero-shot generation ``prompt`` (one
    ``{}`` for the question), ``max_new_tokens``, ``min_length``, ``num_beams``,
    ``length_penalty``; BLIP's ``num_beams``, ``max_new_tokens``, ``min_length``; ALBEF's ``k_test``."""

    vqa_defaults: dict

    def answer_questions(self, images: torch.Tensor, questions: list[str], **settings) -> list[str]: ...


@runtime_checkable
class RanksAnswers(Protocol):
    """A :class:`VqaAnswerer` that picks each answer from a candidate list (ALBEF).
    ``answer_source`` is ``{"file": a JSON list of answers or None, "top": N}``: the file's
    answers, else the N most frequent of the training shards; the evaluation reads them and calls
    ``set_answer_candidates(answers)`` before answering."""

    answer_source: dict

    def set_answer_candidates(self, answers: list[str]) -> None: ...


@runtime_checkable
class Classifier(Protocol):
    """Classifies (image, text) pairs (:mod:`pipeline.eval.classify`): ``classify(images [B, 3, H, W]
    (``[B, 2, 3, H, W]`` for NLVR2's image pairs), texts) -> logits [B, num_classes]``, the true class
    being each sample's ``KEY.json[label_key]`` (an integer, or a boolean: false 0, true 1)."""

    num_classes: int
    label_key: str

    def classify(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor: ...


@runtime_checkable
class LayerwiseLR(Protocol):
    """Per-module learning rates: ``{parameter name prefix: multiplier of optim.lr}`` (METER's
    5x for its cross-modal layers)."""

    def lr_scales(self) -> dict[str, float]: ...


@runtime_checkable
class NoWeightDecay(Protocol):
    """Names of parameters kept out of weight decay (timm's convention)."""

    def no_weight_decay(self) -> Iterable[str]: ...


@runtime_checkable
class HasTeacher(Protocol):
    """Keeps a teacher (momentum / EMA copy) of some of its modules; ``copy_params()`` sets the
    teacher to the student, as after a warm start."""

    def copy_params(self) -> None: ...


def protocol_members(protocol: type) -> list[str]:
    """The attribute and method names a protocol class declares."""
    own = {n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")}
    return sorted(own | set(vars(protocol).get("__annotations__", {})))
