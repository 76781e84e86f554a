"""SNLI-VE: the official jsonl keyed by Flickr30K image ids, with local Flickr30K images.

Input, as published (github.com/necla-ml/SNLI-VE): ``snli_ve_{train,dev,test}.jsonl``, one SNLI
pair a line, ``{"Flickr30K_ID": "3416050480", "sentence1" (the caption the premise image replaces),
"sentence2" (the hypothesis), "gold_label": "entailment"|"neutral"|"contradiction", "pairID",
"captionID", "annotator_labels", ...}``. Image ``Flickr30K_ID`` is ``--images/{id}.jpg`` (or under
``flickr30k-images/``).

One sample per hypothesis: ``KEY.jpg``, ``KEY.txt`` = the hypothesis, ``KEY.json`` = ``{"task":
"snli_ve", "label", "label_id": 0|1|2 (entailment, neutral, contradiction), "hypothesis",
"pair_id", "image_id", "source", "split", "original_size", "size"}``. Bad rows (missing image,
empty hypothesis, a label outside the three, e.g. SNLI's "-" for no consensus) are skipped
and counted; a file that is not JSON lines is a one-line error naming it.
"""
import re
from pathlib import Path

from . import tasks
from .annotations import Parsed, image_candidates, read_jsonl, require_dir
from .reasons import BAD_ROW, EMPTY_TEXT, UNKNOWN_LABEL

NAME = "snli_ve"
HELP = "SNLI-VE official jsonl (snli_ve_{train,dev,test}.jsonl) with local Flickr30K images"
EXPECTED = "SNLI-VE JSON lines {'Flickr30K_ID', 'sentence2', 'gold_label', ...}"
LABELS = ("entailment", "neutral", "contradiction")  # label_id order, as ALBEF's ve_dataset


def parse(path, images_dir: Path, max_words: int) -> Parsed:
    """One row per line with an image id, a hypothesis and one of the three labels."""
    out = Parsed()
    for n, e in enumerate(read_jsonl(path, EXPECTED)):
        image_id = e.get("Flickr30K_ID") if isinstance(e, dict) else None
        if image_id is None or not str(image_id).strip():
            out.fail(BAD_ROW, f"line {n + 1}: expected {{'Flickr30K_ID', 'sentence2', 'gold_label'}}, "
                              f"got {str(e)[:80]}")
            continue
        image_id = str(image_id).strip()
        hypothesis = tasks.clean_text(e.get("sentence2"), max_words)
        if not hypothesis:
            out.fail(EMPTY_TEXT, f"line {n + 1}: pair {e.get('pairID')}")
            continue
        label = e.get("gold_label")
        if label not in LABELS:
            out.fail(UNKNOWN_LABEL, f"line {n + 1}: pair {e.get('pairID')}: gold_label {label!r}")
            continue
        meta = {"task": "snli_ve", "label": label, "label_id": LABELS.index(label), "hypothesis": hypothesis,
                "pair_id": e.get("pairID"), "image_id": image_id}
        paths = image_candidates(images_dir, f"{image_id}.jpg", ("flickr30k-images",))
        out.rows.append(tasks.TaskRow((("jpg", paths),), hypothesis, meta, label))
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--annotations", required=True, metavar="FILE", help="snli_ve_{train,dev,test}.jsonl")
    parser.add_argument("--images", required=True, metavar="DIR", help="Flickr30K image directory ({id}.jpg)")
    parser.add_argument("--split", help="split name (default: the file name's: train, dev, test)")


def run(args) -> dict:
    images_dir = require_dir(args.images, "the Flickr30K image directory (flickr30k-images/)")
    parsed = parse(args.annotations, images_dir, args.max_words)
    match = re.search(r"(train|dev|test)", Path(args.annotations).name)
    split = args.split or (match[1] if match else "train")
    return tasks.build(args, NAME, "snli_ve", parsed, split, [args.annotations])
