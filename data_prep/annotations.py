"""Reading annotation files with clear errors, and the caption formats several sources share.

Parsers return ``(rows, failures, examples)``: the rows to write, and the rows dropped
while parsing counted by reason (with a few examples). A malformed *entry* is one bad row;
a file that is missing, is not JSON, or has the wrong overall shape is a
:class:`DataPrepError` naming the file and what was expected.
"""
import json
import os
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from .captions import clean_captions
from .errors import DataPrepError
from .reasons import BAD_ROW, EMPTY_CAPTION

EVAL_SPLITS = ("val", "test")


class ImageRow(NamedTuple):
    """One sample from local files: candidate image paths (the first that exists is used),
    cleaned captions, the dataset's image id, the split, and which caption goes to KEY.txt."""
    paths: tuple
    captions: tuple
    image_id: object
    split: str
    caption_index: int = 0


class Parsed:
    """Rows plus the parse-time failure counts."""

    def __init__(self):
        self.rows: list = []
        self.failures: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def fail(self, reason: str, detail: str) -> None:
        self.failures[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(str(detail)[:300])


def require_file(path, what: str) -> Path:
    """Return ``path`` as a Path or raise a one-line error if it is not a readable file."""
    p = Path(path)
    if not p.is_file():
        raise DataPrepError(f"{p}: file not found (expected {what})")
    if not os.access(p, os.R_OK):
        raise DataPrepError(f"{p}: not readable (expected {what})")
    return p


def require_dir(path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise DataPrepError(f"{p}: directory not found (expected {what})")
    return p


def load_json(path, what: str):
    """Load a JSON file; a missing file or invalid JSON is a one-line :class:`DataPrepError`."""
    p = require_file(path, what)
    try:
        with open(p, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataPrepError(f"{p}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                            f"expected {what}") from None
    except UnicodeDecodeError:
        raise DataPrepError(f"{p}: not UTF-8 text; expected {what}") from None


def describe(obj) -> str:
    """A short description of what a file actually holds, for error messages."""
    if isinstance(obj, dict):
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        return f"an object with keys {keys or '(none)'}"
    if isinstance(obj, list):
        return f"a list of {len(obj)} {type(obj[0]).__name__ if obj else 'items'}"
    return f"a JSON {type(obj).__name__}"


def image_candidates(images_dir: Path, rel: str, subdirs=()) -> tuple:
    """Where an annotation's image path may live under ``images_dir``: as given, by base
    name (annotation files often carry paths from their authors' machines), or in one of
    the dataset's usual sub-directories."""
    rel = str(rel).replace("\\", "/")
    base = rel.rsplit("/", 1)[-1]
    cands = [images_dir / rel.lstrip("/"), images_dir / base] + [images_dir / s / base for s in subdirs]
    seen, out = set(), []
    for c in cands:
        if str(c) not in seen:
            seen.add(str(c))
            out.append(str(c))
    return tuple(out)


def expand_per_caption(rows: list) -> list:
    """One row per caption (ALBEF's epoch definition) instead of one per image."""
    return [r._replace(caption_index=k) for r in rows for k in range(len(r.captions))]


def split_of_filename(path, default: str = "train") -> str:
    """``coco_karpathy_test.json`` -> ``test``; ``default`` when the name says nothing."""
    name = Path(path).name.lower()
    for split in ("test", "val", "train"):
        if split in name:
            return split
    return default


def parse_karpathy(data: dict, images_dir: Path, split: str, max_words: int,
                   subdirs=()) -> Parsed:
    """Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json``:
    ``{"images": [{"filepath"?, "filename", "sentences": [{"raw"}], "split", "cocoid"|"imgid"}]}``.

    ``split``: ``train`` (Karpathy's train + restval), ``val``, ``test``, ``restval`` or ``all``.
    """
    wanted = {"train": {"train", "restval"}, "all": None}.get(split, {split})
    out = Parsed()
    for n, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "filename" not in img:
            out.fail(BAD_ROW, f"images[{n}]: expected an object with 'filename' and 'sentences'")
            continue
        if wanted is not None and img.get("split") not in wanted:
            continue
        sentences = img.get("sentences") or []
        raw = [s.get("raw") if isinstance(s, dict) else s for s in sentences]
        caps = clean_captions(raw, max_words)
        if not caps:
            out.fail(EMPTY_CAPTION, f"images[{n}]: {img['filename']}")
            continue
        rel = f"{img['filepath']}/{img['filename']}" if img.get("filepath") else img["filename"]
        image_id = img.get("cocoid", img.get("imgid", n))
        out.rows.append(ImageRow(image_candidates(images_dir, rel, subdirs), tuple(caps), image_id,
                                 img.get("split", split)))
    return out


def parse_image_caption_list(data: list, images_dir: Path, split: str, max_words: int,
                             subdirs=(), image_key="image", caption_keys=("caption", "captions")) -> Parsed:
    """The ALBEF/BLIP list ``[{"image": path, "caption": str | [str], "image_id"?}]``.

    Entries naming the same image are merged into one row with all their captions
    (ALBEF's training files repeat the image once per caption), in first-seen order.
    """
    out = Parsed()
    by_image: dict[str, int] = {}
    for n, entry in enumerate(data):
        cap = None
        if isinstance(entry, dict):
            cap = next((entry[k] for k in caption_keys if k in entry), None)
        if not isinstance(entry, dict) or not isinstance(entry.get(image_key), str) or cap is None:
            out.fail(BAD_ROW, f"entry {n}: expected {{'{image_key}': str, 'caption': str or list}}, "
                              f"got {str(entry)[:80]}")
            continue
        caps = clean_captions(cap, max_words)
        if not caps:
            out.fail(EMPTY_CAPTION, f"entry {n}: {entry[image_key]}")
            continue
        rel = entry[image_key]
        if rel in by_image:
            row = out.rows[by_image[rel]]
            merged = tuple(list(row.captions) + [c for c in caps if c not in row.captions])
            out.rows[by_image[rel]] = row._replace(captions=merged)
            continue
        by_image[rel] = len(out.rows)
        image_id = entry.get("image_id", Path(rel).stem)
        out.rows.append(ImageRow(image_candidates(images_dir, rel, subdirs), tuple(caps), image_id, split))
    return out


def read_jsonl(path, what: str) -> list:
    """The decoded lines of a JSON-lines file (``None`` for a line that is not JSON). A file none
    of whose lines is a JSON object is a :class:`DataPrepError` naming it."""
    p = require_file(path, what)
    try:
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise DataPrepError(f"{p}: not UTF-8 text; expected {what}") from None
    rows = []
    for ln in lines:
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            rows.append(None)
    if not any(isinstance(r, dict) for r in rows):
        raise DataPrepError(f"{p}: expected {what}, one JSON object per line; found "
                            + ("an empty file" if not rows else f"no JSON object in line 1: {lines[0][:60]!r}"))
    return rows
