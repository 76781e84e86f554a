"""Accuracy of an (image, text) classifier (SNLI-VE; NLVR2 on image pairs) on a task shard set,
beside the chance level.

The model is a :class:`~pipeline.models.contracts.Classifier`; the true class of a sample is its
``KEY.json[model.label_key]``, an integer class id (SNLI-VE's ``label_id``) or a boolean (NLVR2's
``label``: false 0, true 1). A pair sample reaches the model as ``[B, 2, 3, H, W]``. Several ranks
classify their shards and all-reduce the counts.
"""
from __future__ import annotations


import torch
import torch.distributed as dist

from pipeline.data.loader import build_eval_loader


@torch.no_grad()
def evaluate_shards(model, shards: str, *, image_size: int, batch_size: int = 64, device=None,
                    dtype=torch.float32, rank: int = 0, world_size: int = 1, **_) -> dict:
    """``{"accuracy", "chance", "num_samples"}`` (x100): accuracy of the argmax class, chance =
    the share of the most frequent true class."""
    device = device or torch.device("cpu")
    loader = build_eval_loader(shards, image_size=image_size, batch_size=batch_size, max_words=0,
                               rank=rank, world_size=world_size)
    correct = torch.zeros(1 + model.num_classes, dtype=torch.long, device=device)  # [hits, count per class...]
    for batch in loader:
        texts = [m.get("hypothesis") or m.get("sentence") or c[0] for m, c in zip(batch["meta"], batch["captions"])]
        key = model.label_key
        bad = [k for k, m in zip(batch["key"], batch["meta"]) if not isinstance(m.get(key), int)]  # bool is an int
        if bad:
            raise ValueError(f"eval.shards={shards!r}: samples {bad[:3]}: KEY.json lacks an integer or boolean {key!r}")
        labels = torch.tensor([int(m[key]) for m in batch["meta"]], dtype=torch.long, device=device)
        logits = model.classify(batch["image"].to(device, dtype), texts)
        correct[0] += (logits.argmax(-1) == labels).sum()
        correct[1:] += torch.bincount(labels, minlength=model.num_classes)
    if world_size > 1:
        dist.all_reduce(correct)
    total = int(correct[1:].sum())
    if total == 0:
        raise ValueError(f"eval.shards={shards!r}: no evaluation samples read")
    return {"accuracy": 100.0 * int(correct[0]) / total, "chance": 100.0 * int(correct[1:].max()) / total,
            "num_samples": total}


def evaluate(model, cfg, *, device, dtype, rank: int, world_size: int) -> dict:
    """The trainer's hook (``eval.every``): accuracy on ``cfg.eval.shards``."""
    return evaluate_shards(model, cfg.eval.shards, image_size=cfg.data.image_size, batch_size=cfg.eval.batch_size,
                           device=device, dtype=dtype, rank=rank, world_size=world_size)


def format_table(metrics: dict, *_) -> str:
    return (f"accuracy {metrics['accuracy']:.2f} on {metrics['num_samples']} samples "
            f"(chance {metrics['chance']:.2f})")
