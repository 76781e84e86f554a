"""Image (and video) captioning evaluation: generate on an evaluation shard set, score with
pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr; the COCO caption toolkit's PTB tokenizer).

The model is a :class:`~pipeline.models.contracts.Captioner` (EVLGen, BLIP): a method

    generate_captions(images, *, prompt, max_new_tokens, min_length, num_beams) -> list[str]

taking ``[B, 3, H, W]`` images or ``[B, T, 3, H, W]`` frames, and a ``caption_defaults`` dict
(property or attribute) with those four keyword arguments; ``eval_task="caption"`` in the
model's registry entry routes the trainer's ``eval.every`` and ``launch/demo.sh`` here.

Scores are reported x100 (papers' convention: CIDEr 1.45 -> 145). Each rank captions its share
of the shards; with several ranks every rank makes the same number of ``generate_captions``
calls, since ZeRO-3 gathers parameters collectively: a rank out of data (or without a shard)
steps along on a stand-in batch and drops the result. Rank 0 scores; every rank returns the
metrics.
"""
from __future__ import annotations

import logging
import shutil
from typing import Iterable

import torch
import torch.distributed as dist

from pipeline.data.loader import build_eval_loader

log = logging.getLogger(__name__)

METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
JAVA_HINT = ("METEOR and the PTB tokenizer of pycocoevalcap run Java: install a JRE "
             "(apt-get install default-jre-headless; tests/run.sh does this)")


def require_java() -> None:
    if shutil.which("java") is None:
        raise FileNotFoundError(f"java not found: {JAVA_HINT}")


_METEOR = None


def _meteor():
    """One METEOR scorer (a Java process) per Python process: starting it loads its paraphrase
    tables, about 10 s, so evaluations share it; it ends with the interpreter."""
    global _METEOR
    if _METEOR is None:
        from pycocoevalcap.meteor.meteor import Meteor

        _METEOR = Meteor()
    return _METEOR


def score_captions(references: dict[str, list[str]], candidates: dict[str, str]) -> dict[str, float]:
    """COCO caption metrics of ``candidates`` against ``references`` (same keys), x100.

    Args:
        references: key -> reference captions; candidates: key -> one generated caption.
    Returns:
        ``{"bleu_1" .. "bleu_4", "meteor", "rouge_l", "cider"}``.
    """
    if set(references) != set(candidates):
        raise ValueError(f"score_captions: {len(set(references) ^ set(candidates))} keys differ between "
                         "references and candidates")
    if not candidates:
        raise ValueError("score_captions: nothing to score")
    require_java()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in candidates.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor, _ = _meteor().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    scores = dict(zip(METRICS, [*bleu, meteor, rouge, cider]))
    return {k: 100.0 * float(v) for k, v in scores.items()}


def _batches_in_step(loader: Iterable[dict], world_size: int, device) -> Iterable[tuple[dict, bool]]:
    """``(batch, real)`` pairs, the same count on every rank: a rank out of data (or with no
    shard at all) steps on with a stand-in batch and ``real=False`` until every rank is done."""
    it = iter(loader)
    last, template = None, None
    while True:
        batch = next(it, None)
        if world_size == 1:
            if batch is None:
                return
            yield batch, True
            continue
        flag = torch.tensor([0 if batch is None else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()) == 0:
            return
        if template is None:  # first step, on every rank alike: the shape a stand-in batch takes
            shapes: list = [None] * world_size
            dist.all_gather_object(shapes, None if batch is None else tuple(batch["image"][:1].shape))
            template = next(s for s in shapes if s is not None)
        if batch is None:
            if last is None:
                last = {"image": torch.zeros(template), "key": [], "captions": []}
            yield last, False
        else:
            last = batch
            yield batch, True


@torch.no_grad()
def generate_on_shards(model, shards: str, *, image_size: int, batch_size: int = 32, max_words: int = 30,
                       device=None, dtype=torch.float32, rank: int = 0, world_size: int = 1,
                       limit: int | None = None, **generate) -> list[dict]:
    """Caption every sample of an evaluation shard set.

    Args:
        generate: ``prompt``, ``max_new_tokens``, ``min_length``, ``num_beams`` (default: the
            model's ``caption_defaults``). limit: caption at most this many samples per rank.
    Returns:
        This rank's ``[{"key", "caption", "references", "image"}]``; ``image`` is the first frame
        ``[3, H, W]`` (CPU, normalised) for the first few samples, else None.
    """
    device = device or torch.device("cpu")
    kwargs = dict(model.caption_defaults)
    kwargs.update({k: v for k, v in generate.items() if v is not None})
    missing = {"prompt", "max_new_tokens", "min_length", "num_beams"} - set(kwargs)
    if missing:
        raise ValueError(f"caption generation needs {sorted(missing)} (model.caption_defaults or arguments)")
    loader = build_eval_loader(shards, image_size=image_size, batch_size=batch_size, max_words=max_words,
                               rank=rank, world_size=world_size)
    out: list[dict] = []
    for batch, real in _batches_in_step(loader, world_size, device):
        if limit is not None and len(out) >= limit and world_size == 1:
            break  # with several ranks, every rank keeps stepping until all are done
        images = batch["image"].to(device, dtype)
        captions = model.generate_captions(images, **kwargs)
        if not real or (limit is not None and len(out) >= limit):
            continue
        for i, (key, caption, refs) in enumerate(zip(batch["key"], captions, batch["captions"])):
            keep_image = len(out) < 8
            image = batch["image"][i].clone() if keep_image else None
            if image is not None and image.dim() == 4:
                image = image[0]
            out.append({"key": key, "caption": caption, "references": refs, "image": image})
    return out[:limit] if limit is not None else out


def evaluate_shards(model, shards: str, *, image_size: int, batch_size: int = 32, max_words: int = 30, device=None,
                    dtype=torch.float32, rank: int = 0, world_size: int = 1, limit: int | None = None,
                    **generate) -> tuple[dict, list[dict]]:
    """Caption metrics of ``model`` on a shard set (every rank returns them) and rank 0's list of
    all ``{"key", "caption", "references"}`` (with ``image`` for the first few; empty elsewhere)."""
    mine = generate_on_shards(model, shards, image_size=image_size, batch_size=batch_size, max_words=max_words,
                              device=device, dtype=dtype, rank=rank, world_size=world_size, limit=limit, **generate)
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, [{k: v for k, v in r.items() if k != "image"} for r in mine])
        rows = mine + [r for part in gathered[1:] for r in part] if rank == 0 else []
    else:
        rows = mine
    metrics: dict = {}
    if rank == 0:
        if not rows:
            raise ValueError(f"eval.shards={shards!r}: no evaluation samples read")
        keys = [f"{i}:{r['key']}" for i, r in enumerate(rows)]  # unique even if a key repeats
        metrics = score_captions({k: r["references"] for k, r in zip(keys, rows)},
                                 {k: r["caption"] for k, r in zip(keys, rows)})
        metrics["num_images"] = len(rows)
        metrics["empty_captions"] = sum(1 for r in rows if not r["caption"].strip())
    return share_from_rank0(metrics, world_size), rows


def share_from_rank0(value, world_size: int):
    """``value`` (a picklable object, e.g. metrics only rank 0 computed) as rank 0 has it, on
    every rank; unchanged on one rank."""
    if world_size > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def evaluate(model, cfg, *, device, dtype, rank: int, world_size: int) -> dict:
    """The trainer's hook (``eval.every``): caption metrics on ``cfg.eval.shards``."""
    metrics, _ = evaluate_shards(model, cfg.eval.shards, image_size=cfg.data.image_size,
                                 batch_size=cfg.eval.batch_size, max_words=cfg.data.max_words, device=device,
                                 dtype=dtype, rank=rank, world_size=world_size)
    return metrics


def format_table(metrics: dict, baseline: dict | None = None) -> str:
    """The scores a person reads (x100), with an untrained model's beside when given."""
    head = f"captioning on {metrics['num_images']} images"
    names = {"bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4", "meteor": "METEOR",
             "rouge_l": "ROUGE-L", "cider": "CIDEr"}
    lines = [head, f"{'metric':8s} {'model':>8s}" + (f" {'untrained':>10s}" if baseline else "")]
    for key, name in names.items():
        line = f"{name:8s} {metrics[key]:8.2f}"
        if baseline:
            line += f" {baseline[key]:10.2f}"
        lines.append(line)
    return "\n".join(lines)
