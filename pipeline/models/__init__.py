"""Model registry.

Every backbone registers a typed config dataclass and a builder under a name; the
experiment config's ``model.name`` picks one. Models know nothing of training: a model's
``forward(batch) -> dict`` takes ``batch = {"image": FloatTensor[B, 3, H, W], "text":
list[str], "epoch_progress": float, ...}`` and returns ``{"loss": scalar, "loss_<part>":
scalar..., "tokens_per_layer": list[int], "kept_patches": BoolTensor[B, P] | None}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    config_cls: type
    build: Callable[[Any], nn.Module]
    eval_task: str = "retrieval"  # the evaluation (pipeline.eval.tasks) training and the CLI run


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, config_cls: type, build: Callable[[Any], nn.Module],
                   eval_task: str = "retrieval") -> None:
    """Make ``model.name: <name>`` buildable; ``config_cls`` is the dataclass its YAML fills,
    ``eval_task`` the evaluation that scores it (``retrieval``, ``caption``, ``vqa``, ``classify``)."""
    MODELS[name] = ModelEntry(config_cls, build, eval_task)


BUILTIN = ("albef", "blip", "meter", "meter_vqa", "clip", "evlgen", "albef_ve", "albef_nlvr2", "albef_vqa",
           "blip_vqa")


def _load_builtin() -> None:
    # Imported lazily so that ``pipeline.models`` itself stays cheap and cycle-free.
    import importlib

    for module in BUILTIN:
        importlib.import_module(f"pipeline.models.{module}")


def model_entry(name: str) -> ModelEntry:
    """The registered entry for ``name``; an unknown name is an error listing the known ones."""
    if name not in MODELS:
        _load_builtin()
    if name not in MODELS:
        raise KeyError(f"model.name: unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]


def eval_task(name: str) -> str:
    """The evaluation a model is registered with (``retrieval`` unless it says otherwise)."""
    return model_entry(name).eval_task


def build_model(cfg: Any) -> nn.Module:
    """Build the model named by ``cfg.name`` from its typed config."""
    return model_entry(cfg.name).build(cfg)
