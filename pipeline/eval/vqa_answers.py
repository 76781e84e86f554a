"""The candidate answers a ranking VQA model (ALBEF) chooses from: a JSON list given in the
config (ALBEF's ``answer_list.json``), or the most frequent human answers of the training shards.

Only each sample's ``KEY.json`` is read from the shards (images are skipped unread), once per
shard spec and size in a process, so the trainer's ``eval.every`` pays for it once.
"""
from __future__ import annotations

import functools
import json
import tarfile
from collections import Counter
from pathlib import Path

from pipeline.data.shards import open_shard, parse_shard_spec


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
    sources, _ = parse_shard_spec(shards)
    for source in sources:
        for url in source.urls:
            with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".json"):
                        meta = json.loads(tar.extractfile(member).read())
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
