"""The evaluations by task name, as a model's registry entry names them (``eval_task``) or
``eval.task`` picks one of the others the model provides.

The trainer (``eval.every``) and ``python -m pipeline.eval`` look an evaluation up here; each
says which model protocol it needs, so a model that lacks it is refused before any work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from pipeline.models.contracts import Captioner, Classifier, RetrievalModel, VqaAnswerer, protocol_members

from . import caption, classify, retrieval, vqa


@dataclass(frozen=True)
class Evaluation:
    contract: type  # the protocol (pipeline.models.contracts) a model must provide
    # the trainer's hook: (model, cfg, *, device, dtype, rank, world_size) -> metrics
    evaluate: Callable[..., dict]
    evaluate_shards: Callable  # the same on an explicit shard set (the CLI)
    format_table: Callable[..., str]  # the table a person reads


EVALUATIONS: dict[str, Evaluation] = {
    "retrieval": Evaluation(RetrievalModel, retrieval.evaluate, retrieval.evaluate_shards, retrieval.format_table),
    "caption": Evaluation(Captioner, caption.evaluate, caption.evaluate_shards, caption.format_table),
    "vqa": Evaluation(VqaAnswerer, vqa.evaluate, vqa.evaluate_shards, vqa.format_table),
    "classify": Evaluation(Classifier, classify.evaluate, classify.evaluate_shards, classify.format_table),
}


def evaluation(task: str) -> Evaluation:
    """The evaluation registered as ``task``; an unknown name is an error listing the known ones."""
    if task not in EVALUATIONS:
        raise KeyError(f"evaluation {task!r} is not known; known: {sorted(EVALUATIONS)}")
    return EVALUATIONS[task]


def check_contract(model: nn.Module, task: str, model_name: str) -> None:
    """Refuse a model that does not provide what evaluation ``task`` calls."""
    contract = evaluation(task).contract
    if not isinstance(model, contract):
        raise ValueError(f"model {model_name!r} ({type(model).__name__}) does not provide {contract.__name__} "
                         f"({', '.join(protocol_members(contract))}), which the {task} evaluation calls")

