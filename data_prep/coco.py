"""MS-COCO captions: official ``captions_*2014.json``, Karpathy's ``dataset_coco.json``,
or the ALBEF/BLIP list (``coco_karpathy_{train,val,test}.json``)."""
import re
from collections import defaultdict
from pathlib import Path

from . import download, local
from .annotations import (Parsed, describe, image_candidates, load_json, parse_image_caption_list,
                          parse_karpathy, require_dir, split_of_filename)
from .captions import clean_captions
from .errors import DataPrepError
from .reasons import BAD_ROW, EMPTY_CAPTION

NAME = "coco"
HELP = "MS-COCO captions (official, Karpathy or ALBEF/BLIP json) with local images"
EXPECTED = ("COCO captions JSON: the official {'images': [...], 'annotations': [...]}, Karpathy's "
            "{'images': [{'filename', 'sentences', 'split'}]}, or the ALBEF/BLIP list "
            "[{'image': 'train2014/...jpg', 'caption': str or [str]}]")
SUBDIRS = ("train2014", "val2014", "test2014")
_BLIP = "https://storage.googleapis.com/sfr-vision-language-research/datasets"
# cocodataset.org publishes no checksums: the sizes and sha256 of its zips are those recorded
# by tensorflow-datasets (url_checksums/coco2014.txt and coco.txt agree). BLIP's Karpathy-split
# files (the ALBEF/BLIP pre-training annotations, the ELIP recipe's COCO input) have no
# published size or checksum anywhere we found, so they are not verified.
DOWNLOADS = {
    "images": [download.Remote("http://images.cocodataset.org/zips/train2014.zip", extract=True, size=13510573713,
                               sha256="ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775"),
               download.Remote("http://images.cocodataset.org/zips/val2014.zip", extract=True, size=6645013297,
                               sha256="fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0")],
    "official": download.Remote("http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
                                extract=True, size=252872794,
                                sha256="031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009"),
    "karpathy": {s: download.Remote(f"{_BLIP}/coco_karpathy_{s}.json") for s in ("train", "val", "test")},
}


def parse_official(data: dict, images_dir: Path, max_words: int) -> Parsed:
    """``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``: one row per
    image, in the order of ``images``, with all its captions."""
    out = Parsed()
    captions = defaultdict(list)
    known = set()
    images = []
    for n, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            out.fail(BAD_ROW, f"images[{n}]: expected {{'id', 'file_name'}}, got {str(img)[:80]}")
            continue
        known.add(img["id"])
        images.append(img)
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or ann.get("image_id") not in known:
            out.fail(BAD_ROW, f"annotations[{n}]: no image with image_id {str(ann)[:80]}")
            continue
        captions[ann["image_id"]].append(ann.get("caption"))
    for img in images:
        caps = clean_captions(captions[img["id"]], max_words)
        if not caps:
            out.fail(EMPTY_CAPTION, f"image {img['id']}: {img['file_name']}")
            continue
        split = img["file_name"].split("_")[1] if img["file_name"].count("_") >= 2 else "train"
        out.rows.append(local.ImageRow(image_candidates(images_dir, img["file_name"], SUBDIRS),
                                       tuple(caps), img["id"], split))
    return out


def parse(path, images_dir: Path, split: str | None, max_words: int) -> tuple[Parsed, str]:
    """Parse any of the three COCO formats; return the rows and the split they belong to."""
    data = load_json(path, EXPECTED)
    if isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list):
        # official files: the split is the image set (train2014, val2014), not an evaluation split
        image_set = re.search(r"(train|val|test)20\d\d", Path(path).name)
        return parse_official(data, images_dir, max_words), split or (image_set[0] if image_set else "train")
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        split = split or "train"
        return parse_karpathy(data, images_dir, split, max_words, SUBDIRS), split
    if isinstance(data, list):
        split = split or split_of_filename(path)
        return parse_image_caption_list(data, images_dir, split, max_words, SUBDIRS), split
    raise DataPrepError(f"{path}: expected {EXPECTED}; found {describe(data)}")


def add_arguments(parser) -> None:
    local.add_image_arguments(parser, "captions_train2014.json, dataset_coco.json or coco_karpathy_*.json")
    parser.add_argument("--split", choices=("train", "val", "test", "restval", "all"),
                        help="Karpathy split to take (default train = train + restval); val and test "
                             "become evaluation sets with all 5 captions per image. Default for ALBEF/BLIP "
                             "lists: from the file name")
    download.add_arguments(parser)


def run(args) -> dict:
    if args.download:
        cache = download.cache_dir_of(args)
        split = args.split if args.split in ("val", "test") else "train"
        # the official annotations come too (unpacked to CACHE/annotations/captions_*2014.json)
        remotes = [DOWNLOADS["karpathy"][split], DOWNLOADS["official"], *DOWNLOADS["images"]]
        download.fetch_all(remotes, cache, args.mirror, not args.no_progress)
        args.annotations = args.annotations or str(cache / DOWNLOADS["karpathy"][split].filename)
        args.images = args.images or str(cache)
    if not args.annotations or not args.images:
        raise DataPrepError("coco needs --annotations FILE and --images DIR (or --download)")
    images_dir = require_dir(args.images, "the COCO image directory (holding train2014/ and val2014/)")
    parsed, split = parse(args.annotations, images_dir, args.split, args.max_words)
    return local.build(args, NAME, parsed, split, [args.annotations])
