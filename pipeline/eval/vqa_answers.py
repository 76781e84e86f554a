"""The answer vocabulary of a VQA classifier (``meter_vqa``'s ``model.answers``) from training shards.

``python -m pipeline.eval.vqa_answers SPEC [--min-count 9] --out answers.json`` builds it as
METER's ``write_vqa.py`` does: each question's majority answer (VQAv2's
``multiple_choice_answer``, the most frequent of its human answers; ties go to the first given),
kept when at least ``min_count`` questions have it (METER: 9 over VQAv2 train+val, 3,129
answers), in the order first seen. Only each sample's ``KEY.json`` is read.

One difference: METER normalises the majority answers (``normalize_word``) but scores the raw
human answers against them; VQAv2's annotation files store answers normalised already, so both
agree there. Here the vocabulary keeps the raw strings, so that the soft scores (which count raw
human answers, as METER's) match on any set, e.g. the synthetic one's "two"; the VQA evaluation
normalises the predicted and the human answers alike before comparing.
"""
from __future__ import annotations

import argparse
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
            with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".json"):
                        yield json.loads(tar.extractfile(member).read())


def build_vocabulary(spec: str, min_count: int = 9) -> list[str]:
    """The answers that at least ``min_count`` questions of ``spec`` have as their majority answer."""
    return [a for a, n in majority_answers(shard_metas(spec)).items() if n >= min_count]


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
