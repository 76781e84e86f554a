"""Zero-shot VQA evaluation (EVLGen / BLIP-2's protocol): answer every question of a VQA shard set
(``data_prep`` ``vqav2``, ``okvqa``, ``gqa``, ``synthetic_vqa``), score with
:mod:`pipeline.eval.vqa_metric`.

The model is a :class:`~pipeline.models.contracts.VqaAnswerer`: ``answer_questions(images,
questions, **settings)`` and ``vqa_defaults``, the settings it takes (EVLGen's prompt and beam
search, BLIP's beam search, ALBEF's ``k_test``); a setting the model does not take is refused by
name. A :class:`~pipeline.models.contracts.RanksAnswers` model (ALBEF) first gets its candidate
answers (:mod:`pipeline.eval.vqa_answers`). Each sample's ``KEY.json`` gives ``question_id``, ``question``,
``answers`` (the human answers; empty for test-dev), ``answer_type`` and ``dataset``; the
dataset picks the rule (``gqa``: exact match, else VQAv2 accuracy). A shard set without answers
(test-dev) is answered, not scored: the results file is what the evaluation server takes.

Answers are post-processed before scoring and writing: the first line, lower case, without
surrounding spaces and final punctuation (the official normalisation then applies in the
metric). BLIP-2 also lemmatises with spaCy, which this project does not depend on. Several ranks
answer their shards' questions in lock-step (ZeRO-3, see :func:`pipeline.eval.caption._batches_in_step`);
rank 0 gathers and scores, and every rank returns the metrics.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.data.loader import build_eval_loader
from pipeline.eval.caption import _batches_in_step, share_from_rank0
from pipeline.eval.vqa_answers import candidate_answers
from pipeline.eval.vqa_metric import score
from pipeline.models.contracts import RanksAnswers


def clean_answer(text: str) -> str:
    """``"Two.\\nQuestion: ..."`` -> ``"two"``: the first line, lower case, trimmed of spaces and
    final ``. , ; : ! ?``."""
    return text.split("\n")[0].strip().lower().rstrip(".,;:!?").strip()


def _question(meta: dict, key: str) -> dict:
    missing = [k for k in ("question_id", "question") if k not in meta]
    if missing or not isinstance(meta.get("answers", []), list):
        raise ValueError(f"sample {key!r}: KEY.json lacks {missing or ['answers (a list)']}; "
                         "is this a VQA shard set (data_prep vqav2 / okvqa / gqa / synthetic_vqa)?")
    return {"question_id": meta["question_id"], "question": meta["question"], "answers": meta.get("answers", []),
            "answer_type": meta.get("answer_type"), "dataset": meta.get("dataset", "vqav2")}


@torch.no_grad()
def answer_on_shards(model, shards: str, *, image_size: int, batch_size: int = 32, device=None,
                     dtype=torch.float32, rank: int = 0, world_size: int = 1, limit: int | None = None,
                     **generate) -> list[dict]:
    """Answer every question of this rank's share of ``shards``.

    Args:
        generate: settings overriding the model's ``vqa_defaults`` (None: the default); one the
            model does not take is a ValueError. limit: at most this many questions per rank.
    Returns:
        ``[{"question_id", "question", "answer", "answers", "answer_type", "dataset", "key"}]``.
    """
    device = device or torch.device("cpu")
    kwargs = settings(model, generate)
    loader = build_eval_loader(shards, image_size=image_size, batch_size=batch_size, max_words=0,
                               rank=rank, world_size=world_size)
    out: list[dict] = []
    for batch, real in _batches_in_step(loader, world_size, device):
        if limit is not None and len(out) >= limit and world_size == 1:
            break
        images = batch["image"].to(device, dtype)
        if real:
            rows = [dict(_question(m, k), key=k) for m, k in zip(batch["meta"], batch["key"])]
        else:  # a stand-in batch keeps this rank in step with the others; its answers are dropped
            rows = [{"question": "?"}] * images.shape[0]
        answers = model.answer_questions(images, [r["question"] for r in rows], **kwargs)
        if not real or (limit is not None and len(out) >= limit):
            continue
        out.extend(dict(r, answer=clean_answer(a)) for r, a in zip(rows, answers))
    return out[:limit] if limit is not None else out


def settings(model, overrides: dict) -> dict:
    """The model's ``vqa_defaults`` with the ``overrides`` that are not None; a setting the model
    does not take is a ValueError naming it and the ones it takes."""
    kwargs = dict(model.vqa_defaults)
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(kwargs))
    if unknown:
        raise ValueError(f"VQA settings {unknown} are not taken by {type(model).__name__}, which takes "
                         f"{sorted(kwargs)}")
    return kwargs | given


def prepare(model, train_shards: str | None) -> None:
    """Give a ranking model (ALBEF) its candidate answers, from its ``answer_source``: the JSON
    file, else the most frequent answers of ``train_shards``."""
    if isinstance(model, RanksAnswers):
        model.set_answer_candidates(candidate_answers(model.answer_source, train_shards))


def score_rows(rows: list[dict]) -> dict:
    """``{"accuracy", "per_answer_type", "num_questions", "dataset", "scored"}`` of answered rows.
    Rows without human answers (test-dev) leave ``scored`` False and no accuracy; a mix of
    datasets, or of answered and unanswered questions, is an error."""
    if not rows:
        raise ValueError("no VQA questions read")
    datasets = sorted({r["dataset"] for r in rows})
    if len(datasets) != 1:
        raise ValueError(f"VQA shards mix datasets {datasets}: score each on its own (their rules differ)")
    with_answers = sum(1 for r in rows if r["answers"])
    out = {"dataset": datasets[0], "num_questions": len(rows), "scored": with_answers > 0}
    if 0 < with_answers < len(rows):
        raise ValueError(f"{len(rows) - with_answers} of {len(rows)} questions have no human answers: "
                         "a shard set is either annotated or test-dev, not both")
    if with_answers:
        ids = [r["question_id"] for r in rows]
        if len(set(ids)) != len(ids):
            raise ValueError("VQA shards repeat question ids: a question is scored once")
        m = score({r["question_id"]: r["answer"] for r in rows},
                  {r["question_id"]: r for r in rows}, dataset=datasets[0])
        out.update(accuracy=m["overall"], per_answer_type=m["per_answer_type"])
    return out


def evaluate_shards(model, shards: str, *, image_size: int, batch_size: int = 32, device=None,
                    dtype=torch.float32, rank: int = 0, world_size: int = 1, limit: int | None = None,
                    **generate) -> tuple[dict, list[dict]]:
    """VQA metrics of ``model`` on ``shards`` (every rank returns them) and rank 0's rows of all
    ranks (empty elsewhere)."""
    mine = answer_on_shards(model, shards, image_size=image_size, batch_size=batch_size, device=device, dtype=dtype,
                            rank=rank, world_size=world_size, limit=limit, **generate)
    rows = mine
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, mine)
        rows = [r for part in gathered for r in part] if rank == 0 else []
    metrics: dict = score_rows(rows) if rank == 0 else {}
    return share_from_rank0(metrics, world_size), rows


def evaluate(model, cfg, *, device, dtype, rank: int, world_size: int) -> dict:
    """The trainer's hook (``eval.every`` with ``eval.task: vqa``): VQA accuracy on ``cfg.eval.shards``."""
    prepare(model, cfg.data.train_shards)
    metrics, _ = evaluate_shards(model, cfg.eval.shards, image_size=cfg.data.image_size,
                                 batch_size=cfg.eval.batch_size, device=device, dtype=dtype, rank=rank,
                                 world_size=world_size)
    return {k: v for k, v in metrics.items() if k != "per_answer_type"} | {
        f"accuracy_{t}": a for t, a in metrics.get("per_answer_type", {}).items()}


def format_table(metrics: dict, chance: float | None = None) -> str:
    """The accuracy a person reads (x100), per answer type, with the chance level when known."""
    head = f"VQA ({metrics['dataset']}) on {metrics['num_questions']} questions"
    if not metrics["scored"]:
        return head + ": no human answers (test-dev): results written for the evaluation server"
    rule = "exact match" if metrics["dataset"] == "gqa" else "VQA accuracy"
    lines = [head, f"{rule:<14s} {metrics['accuracy']:6.2f}"
             + (f"   (chance {100 * chance:.2f})" if chance is not None else "")]
    lines += [f"  {t:<12s} {a:6.2f}" for t, a in metrics["per_answer_type"].items()]
    return "\n".join(lines)
