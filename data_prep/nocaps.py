"""NoCaps validation: its COCO-style captions JSON, images from their URLs (img2dataset) or local.

Input, as published (nocaps.org): ``nocaps_val_4500_captions.json`` ``{"images": [{"id",
"open_images_id", "file_name", "coco_url", "domain": "in-domain"|"near-domain"|"out-domain",
"width", "height", ...}], "annotations": [{"image_id", "id", "caption"}]}`` (ten captions per
image). Without ``--images`` the images are downloaded from ``coco_url`` through img2dataset
(:mod:`data_prep.urls`, resumable, failures counted by reason); with ``--images DIR`` they are read
from ``DIR/file_name``.

One sample per image in the caption schema: ``KEY.jpg``, ``KEY.txt`` = the first caption,
``KEY.json`` = ``{"task": "caption", "image_id", "captions": [all, cleaned], "domain",
"open_images_id", "source", "split": "val", "original_size", "size"}`` (URL rows also ``url``;
their ``image_id`` is a string). Images without captions are skipped and counted.
"""
from collections import defaultdict
from pathlib import Path

from . import tasks, urls
from .annotations import Parsed, describe, image_candidates, load_json, require_dir
from .captions import clean_captions
from .errors import DataPrepError
from .reasons import BAD_ROW, EMPTY_CAPTION

NAME = "nocaps"
HELP = "NoCaps validation captions JSON, images from coco_url (img2dataset) or a local directory"
EXPECTED = ("NoCaps captions JSON {'images': [{'id', 'file_name', 'coco_url', 'domain', ...}], "
            "'annotations': [{'image_id', 'caption'}]}")
SPLIT = "val"


def _images_and_captions(path, max_words: int):
    data = load_json(path, EXPECTED)
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise DataPrepError(f"{path}: expected {EXPECTED}; found {describe(data)}")
    captions = defaultdict(list)
    for ann in data["annotations"]:
        if isinstance(ann, dict):
            captions[ann.get("image_id")].append(ann.get("caption"))
    out = Parsed()
    images = []
    for n, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img:
            out.fail(BAD_ROW, f"images[{n}]: expected {{'id', 'file_name', 'coco_url', ...}}, got {str(img)[:80]}")
            continue
        caps = clean_captions(captions.get(img["id"], []), max_words)
        if not caps:
            out.fail(EMPTY_CAPTION, f"images[{n}]: image {img['id']}")
            continue
        images.append((n, img, caps))
    return out, images


def _meta(img: dict) -> dict:
    return {"task": "caption", "domain": img.get("domain"), "open_images_id": img.get("open_images_id")}


def parse_local(path, images_dir: Path, max_words: int) -> Parsed:
    out, images = _images_and_captions(path, max_words)
    for n, img, caps in images:
        if not isinstance(img.get("file_name"), str):
            out.fail(BAD_ROW, f"images[{n}]: no 'file_name'")
            continue
        meta = {**_meta(img), "image_id": img["id"], "captions": caps, "file": img["file_name"]}
        out.rows.append(tasks.TaskRow((("jpg", image_candidates(images_dir, img["file_name"], ("validation",))),),
                                      caps[0], meta))
    return out


def parse_urls(path, max_words: int) -> Parsed:
    out, images = _images_and_captions(path, max_words)
    for n, img, caps in images:
        urls.add_row(out, f"images[{n}]", img.get("coco_url"), caps, img["id"], max_words, extra=_meta(img))
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--annotations", required=True, metavar="FILE", help="nocaps_val_4500_captions.json")
    parser.add_argument("--images", metavar="DIR",
                        help="local NoCaps images (DIR/file_name); default: download each coco_url with img2dataset")
    urls.add_arguments(parser)


def run(args) -> dict:
    if args.images:
        images_dir = require_dir(args.images, "the NoCaps image directory")
        return tasks.build(args, NAME, "caption", parse_local(args.annotations, images_dir, args.max_words),
                           SPLIT, [args.annotations])
    return urls.build(args, NAME, parse_urls(args.annotations, args.max_words), SPLIT, [args.annotations],
                      task="caption")
