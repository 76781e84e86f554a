"""Reading the official VQAv2 / OK-VQA files and a results file for :mod:`pipeline.eval.vqa_metric`.

- questions: ``{"questions": [{"question_id", "image_id", "question"}], ...}``
  (``v2_OpenEnded_mscoco_val2014_questions.json``, OK-VQA's ``OpenEnded_mscoco_val2014_questions.json``);
- annotations: ``{"annotations": [{"question_id", "answers": [{"answer", "answer_confidence",
  "answer_id"}], "answer_type", "question_type", "multiple_choice_answer", ...}], ...}``
  (``v2_mscoco_val2014_annotations.json``, ``mscoco_val2014_annotations.json``);
- results, the submission format: ``[{"question_id": int, "answer": str}]``.

Every problem is a ``ValueError`` whose message names the file (and the entry) at fault.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.files import atomic_write_text


def _load(path, what: str):
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: file not found (expected {what})")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                         f"expected {what}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{p}: not UTF-8 text; expected {what}") from None


def _entries(path, data, key: str, fields: tuple, what: str) -> list[dict]:
    entries = data.get(key) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected {what}, found no '{key}' list")
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or any(f not in e for f in fields):
            raise ValueError(f"{path}: {key}[{n}] lacks {', '.join(repr(f) for f in fields)}: {str(e)[:100]}")
    return entries


def load_official(questions_path, annotations_path) -> dict:
    """``question id -> {"question", "image_id", "answers": [raw str], "answer_type",
    "question_type"}`` for every annotated question, in the annotation file's order."""
    qs = _entries(questions_path, _load(questions_path, "VQA questions JSON {'questions': [...]}"),
                  "questions", ("question_id", "question"), "VQA questions JSON {'questions': [...]}")
    anns = _entries(annotations_path, _load(annotations_path, "VQA annotations JSON {'annotations': [...]}"),
                    "annotations", ("question_id", "answers"), "VQA annotations JSON {'annotations': [...]}")
    by_id = {q["question_id"]: q for q in qs}
    out = {}
    for n, a in enumerate(anns):
        q = by_id.get(a["question_id"])
        if q is None:
            raise ValueError(f"{annotations_path}: annotations[{n}] has question_id {a['question_id']}, "
                             f"which is not in {questions_path}")
        answers = [x.get("answer") if isinstance(x, dict) else None for x in a["answers"]]
        if not answers or not all(isinstance(x, str) for x in answers):
            raise ValueError(f"{annotations_path}: annotations[{n}] (question_id {a['question_id']}): "
                             f"expected answers [{{'answer': str}}, ...], got {str(a['answers'])[:100]}")
        out[a["question_id"]] = {"question": q["question"], "image_id": q.get("image_id"), "answers": answers,
                                 "answer_type": a.get("answer_type"), "question_type": a.get("question_type")}
    return out


def load_results(path) -> dict:
    """``question id -> answer`` from a results file ``[{"question_id", "answer"}]``; a question
    answered twice is an error (the evaluation server refuses such files too)."""
    data = _load(path, "VQA results JSON [{'question_id': int, 'answer': str}]")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list [{{'question_id': int, 'answer': str}}], "
                         f"found a JSON {type(data).__name__}")
    out, first = {}, {}
    for n, r in enumerate(data):
        if not isinstance(r, dict) or "question_id" not in r or not isinstance(r.get("answer"), str):
            raise ValueError(f"{path}: entry {n}: expected {{'question_id': int, 'answer': str}}, got {str(r)[:100]}")
        if r["question_id"] in out:
            raise ValueError(f"{path}: question_id {r['question_id']} is answered twice "
                             f"(entries {first[r['question_id']]} and {n})")
        out[r["question_id"]] = r["answer"]
        first[r["question_id"]] = n
    return out


def write_results(path, answers: dict) -> None:
    """Write ``question id -> answer`` in the submission format ``[{"question_id", "answer"}]``."""
    atomic_write_text(path, json.dumps([{"question_id": q, "answer": a} for q, a in answers.items()]) + "\n")
