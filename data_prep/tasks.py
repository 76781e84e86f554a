"""What the downstream sources (VQAv2, OK-VQA, GQA, NLVR2, SNLI-VE, NoCaps) share: a row of one
or two local images with a text and its ``KEY.json`` fields, the sampler that reads them, and the
build step through the common resumable writer.

A sample is ``KEY.<ext>`` per image (``jpg``; NLVR2: ``left.jpg`` and ``right.jpg``), ``KEY.txt``
(the question, statement, hypothesis or first caption) and ``KEY.json`` (the row's fields plus
``source``, ``split``, ``original_size`` and ``size`` of each image: ``[w, h]``, or for two images
``{"left": [w, h], "right": [w, h]}``). The manifest entry of each prefix records the ``task``
and its ``chance`` level: the share of the most frequent answer or label among the rows.
"""
import os
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from . import writer
from .annotations import EVAL_SPLITS, Parsed
from .local import read_local_image

_SPACES = re.compile(r"\s+")


class TaskRow(NamedTuple):
    """One downstream sample from local files.

    ``images``: ``((ext, candidate paths), ...)``, the first existing path of each is used;
    ``text``: ``KEY.txt``; ``meta``: the task's ``KEY.json`` fields; ``target``: the answer or label
    the chance level counts (hashable).
    """
    images: tuple
    text: str
    meta: dict
    target: object = None


def clean_text(text, max_words: int = 0) -> str:
    """A question / statement / hypothesis as published, whitespace collapsed and cut to
    ``max_words`` words (``<= 0`` keeps all); ``""`` for a non-string. Case and punctuation are
    kept: the models' own text processing (ALBEF's ``pre_question``, BLIP-2's prompt) expects them."""
    if not isinstance(text, str):
        return ""
    words = _SPACES.sub(" ", text).strip().split(" ")
    return " ".join(words[:max_words] if max_words > 0 else words).strip()


def chance_level(rows) -> float | None:
    """Share of the most frequent ``target`` among ``rows`` (None without targets)."""
    targets = Counter(r.target for r in rows if r.target is not None)
    return max(targets.values()) / sum(targets.values()) if targets else None


class TaskSampler:
    """Picklable ``make_sample``: read and resize each image of a :class:`TaskRow`."""

    def __init__(self, source: str, split: str, image_size: int, resize_mode: str, min_image_size: int):
        self.source, self.split, self.image_size = source, split, image_size
        self.resize_mode, self.min_image_size = resize_mode, min_image_size

    def _image(self, paths: tuple):
        return read_local_image(paths, self.image_size, self.resize_mode, self.min_image_size)[1]

    def __call__(self, row_index: int, row: TaskRow) -> dict:
        sample, original, stored = {}, {}, {}
        for ext, paths in row.images:
            sample[ext], original[ext], stored[ext] = self._image(paths)
        sample["txt"] = row.text
        sample["json"] = {**row.meta, "source": self.source, "split": self.split,
                          "original_size": _by_side(original), "size": _by_side(stored)}
        return sample


def _by_side(sizes: dict):
    """``[w, h]`` of one image; ``{"left": [w, h], "right": [w, h]}`` of a pair (``left.jpg`` -> ``left``)."""
    if len(sizes) == 1:
        return list(next(iter(sizes.values())))
    return {ext.split(".")[0]: list(size) for ext, size in sizes.items()}


def split_prefix(source: str, split: str) -> str:
    """Default shard prefix: ``vqav2`` for train, ``vqav2_val``, ``nlvr2_test1``, ... else
    (letters, digits and ``_`` only, as the writer requires)."""
    return source if split == "train" else re.sub(r"[^A-Za-z0-9_]", "", f"{source}_{split}")


def build(args, source: str, task: str, parsed: Parsed, split: str, input_files: list) -> dict:
    """Shard the :class:`TaskRow` rows of ``parsed`` under ``args.out`` (resumable, counted)."""
    is_eval = split in EVAL_SPLITS or split.startswith(("test", "dev"))
    fingerprint = {
        "inputs": [[str(Path(p).resolve()), Path(p).stat().st_size] for p in input_files],
        "images": str(Path(args.images).resolve()), "split": split, "max_words": args.max_words,
        "image_size": args.image_size, "resize_mode": args.resize_mode, "min_image_size": args.min_image_size,
    }
    sampler = TaskSampler(source, split, args.image_size, args.resize_mode, args.min_image_size)
    return writer.write_dataset(
        args.out, args.prefix or split_prefix(source, split), source, parsed.rows, sampler,
        shard_size=args.shard_size, fingerprint=fingerprint, parse_failures=parsed.failures,
        parse_examples=parsed.examples,
        extra={"split": split, "eval": is_eval, "task": task, "chance": chance_level(parsed.rows)},
        workers=args.workers or os.cpu_count() or 1, overwrite=args.overwrite, min_shards=args.min_shards,
        show_progress=not args.no_progress, part=args.part)
