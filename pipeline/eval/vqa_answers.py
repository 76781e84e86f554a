"""VQA answer sets from training shards: the vocabulary a classifier predicts over (METER's
``model.answers``) and the candidates a ranking model chooses from (ALBEF's ``model.answers``).

``python -m pipeline.eval.vqa_answers SPEC [--min-count 9] --out answers.json`` builds the
classifier's vocabulary as METER's ``write_vqa.py`` does: each question's majority answer
(VQAv2's ``multiple_choice_answer``, the most frequent of its human answers; ties go to the first
given), kept when at least ``min_count`` questions have it (METER: 9 over VQAv2 train+val, 3,129
answers), in the order first seen. A ranking model's candidates are a JSON list given in the
config (ALBEF's ``answer_list.json``) or the most frequent human answers of the training shards,
read once per shard spec and size in a process, so the trainer's ``eval.every`` pays for it once.
Only each sample's ``KEY.json`` is read (images are skipped unread).

One difference from METER: METER normalises the majority answers (``normalize_word``) but scores
the raw human answers against them; VQAv2's annotation files store answers normalised already, so
both agree there. Here the vocabulary keeps the raw strings, so that the soft scores (which count
raw human answers, as METER's) match on any set, e.g. the synthetic one's "two"; the VQA
evaluation normalises the predicted and the human answers alike before comparing.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

from pipeline.data.shards import ShardSpecError, open_shard, parse_shard_spec


def majority_answers(metas) -> Counter:
    """``{majority answer: number of questions}`` over ``KEY.json`` dicts, first seen first."""
    counts: Counter = Counter()
    for meta in metas:
        answers = meta.get("answers") or []
        if answers:
            counts[Counter(answers).most_common(1)[0][0]] += 1
    return counts


def shard_metas(spec: str):
    """Every sample's ``KEY.json`` of the shards in ``spec``, in order (images are not decoded)."""
    for source in parse_shard_spec(spec)[0]:
        for url in source.urls:
            with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".json"):
                        yield json.loads(tar.extractfile(member).read())


def build_vocabulary(spec: str, min_count: int = 9) -> list[str]:
    """The answers that at least ``min_count`` questions of ``spec`` have as their majority answer."""
    return [a for a, n in majority_answers(shard_metas(spec)).items() if n >= min_count]


def read_answer_list(path: str, key: str = "model.answers.file") -> list[str]:
    """A JSON list of answer strings; anything else is an error naming ``key`` and the file."""
    try:
        answers = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{key}={path}: cannot read a JSON answer list ({err})") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError(f"{key}={path}: expected a non-empty JSON list of answer strings")
    return answers


@functools.lru_cache(maxsize=4)
def top_answers(shards: str, top: int) -> tuple[str, ...]:
    """The ``top`` most frequent human answers (lower case, trimmed) over every question in
    ``shards``, most frequent first (ties: first seen); shards without answers are an error."""
    counts: Counter = Counter()
    for meta in shard_metas(shards):
        counts.update(a.strip().lower() for a in meta.get("answers", []) if isinstance(a, str))
    if not counts:
        raise ValueError(f"data.train_shards={shards}: no human answers in KEY.json to build the candidate "
                         "answer list from; give model.answers.file (a JSON list) instead")
    return tuple(a for a, _ in counts.most_common(top))


def candidate_answers(source: dict, train_shards: str | None) -> list[str]:
    """A ranking model's candidates from its ``answer_source`` (``{"file", "top"}``)."""
    if source.get("file"):
        return read_answer_list(source["file"])
    if not train_shards:
        raise ValueError("the VQA candidate answers come from data.train_shards, which is empty: "
                         "set it or model.answers.file")
    return list(top_answers(train_shards, int(source["top"])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.eval.vqa_answers", description=__doc__.split("\n")[0])
    parser.add_argument("shards", help="VQA training shards (data_prep vqav2 / okvqa / synthetic_vqa), '::'-joined")
    parser.add_argument("--min-count", type=int, default=9, help="questions an answer needs (METER: 9)")
    parser.add_argument("--out", required=True, help="the JSON list to write (model.answers)")
    args = parser.parse_args(argv)
    try:
        answers = build_vocabulary(args.shards, args.min_count)
    except (ShardSpecError, OSError, tarfile.TarError, json.JSONDecodeError) as err:
        print(f"error: {args.shards}: {err}", file=sys.stderr)
        return 1
    if not answers:
        print(f"error: {args.shards}: no answer is the majority answer of {args.min_count} questions "
              "(annotated VQA shards?)", file=sys.stderr)
        return 1
    Path(args.out).write_text(json.dumps(answers, indent=0) + "\n")
    print(f"{len(answers)} answers written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
