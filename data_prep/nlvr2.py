"""NLVR2: the official jsonl (one example a line) with the left/right image pairs.

Input, as published (github.com/lil-lab/nlvr, ``nlvr2/data/{train,dev,test1}.json``, JSON lines
despite the name): ``{"identifier": "dev-850-0-0", "sentence", "label": "True"|"False",
"left_url", "right_url", "directory" (train only), "synset", "query", "writer", ...}``. The pair's
images are ``SPLIT-SET-PAIR-img0.png`` (left) and ``-img1.png`` (right), i.e. the identifier without
its last (sentence) part; they are looked up under ``--images`` as ``SPLIT/DIRECTORY/NAME``
(train), ``SPLIT/NAME``, ``images/SPLIT/...`` (the layout of the images zip) and ``NAME``.

One sample per sentence: ``KEY.left.jpg``, ``KEY.right.jpg``, ``KEY.txt`` = the sentence, ``KEY.json`` =
``{"task": "nlvr2", "label": true|false, "identifier", "sentence", "images": [left, right file names],
"source", "split", "original_size": {"left", "right"}, "size": {...}}``. Bad rows (a missing
image, an empty sentence, a label other than "True"/"False", a malformed line) are skipped and
counted; a file that is not JSON lines is a one-line error naming it.
"""
from pathlib import Path

from . import tasks
from .annotations import Parsed, read_jsonl, require_dir
from .reasons import BAD_ROW, EMPTY_TEXT, UNKNOWN_LABEL

NAME = "nlvr2"
HELP = "NLVR2 official jsonl (train.json, dev.json, test1.json) with local image pairs"
EXPECTED = "NLVR2 JSON lines {'identifier', 'sentence', 'label': 'True'|'False', ...}"
LABELS = {"True": True, "False": False}


def _pair(images_dir: Path, split_dir: str, directory, stem: str) -> tuple:
    def candidates(name):
        rels = [f"{split_dir}/{directory}/{name}"] if directory is not None else []
        rels += [f"{split_dir}/{name}", f"images/{split_dir}/{directory}/{name}", f"images/{split_dir}/{name}", name]
        return tuple(dict.fromkeys(str(images_dir / r) for r in rels))
    return (("left.jpg", candidates(f"{stem}-img0.png")), ("right.jpg", candidates(f"{stem}-img1.png")))


def parse(path, images_dir: Path, max_words: int) -> Parsed:
    """One row per line with a sentence, a pair and a known label."""
    out = Parsed()
    for n, e in enumerate(read_jsonl(path, EXPECTED)):
        ident = e.get("identifier") if isinstance(e, dict) else None
        if not isinstance(ident, str) or ident.count("-") < 3:
            out.fail(BAD_ROW, f"line {n + 1}: expected {{'identifier': 'split-set-pair-sentence', ...}}, "
                              f"got {str(e)[:80]}")
            continue
        sentence = tasks.clean_text(e.get("sentence"), max_words)
        if not sentence:
            out.fail(EMPTY_TEXT, f"line {n + 1}: {ident}")
            continue
        if e.get("label") not in LABELS:
            out.fail(UNKNOWN_LABEL, f"line {n + 1}: {ident}: label {e.get('label')!r} (expected 'True' or 'False')")
            continue
        stem = ident.rsplit("-", 1)[0]
        images = _pair(images_dir, ident.split("-", 1)[0], e.get("directory"), stem)
        meta = {"task": "nlvr2", "label": LABELS[e["label"]], "identifier": ident, "sentence": sentence,
                "images": [f"{stem}-img0.png", f"{stem}-img1.png"]}
        out.rows.append(tasks.TaskRow(images, sentence, meta, LABELS[e["label"]]))
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--annotations", required=True, metavar="FILE", help="train.json, dev.json or test1.json")
    parser.add_argument("--images", required=True, metavar="DIR",
                        help="NLVR2 image root (train/DIRECTORY/*.png, dev/*.png, test1/*.png)")
    parser.add_argument("--split", help="split name (default: the file name's: train, dev, test1)")


def run(args) -> dict:
    images_dir = require_dir(args.images, "the NLVR2 image directory (train/, dev/, test1/)")
    parsed = parse(args.annotations, images_dir, args.max_words)
    split = args.split or Path(args.annotations).name.split(".")[0]
    return tasks.build(args, NAME, "nlvr2", parsed, split, [args.annotations])
