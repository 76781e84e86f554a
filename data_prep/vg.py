"""Visual Genome: the official ``region_descriptions.json`` (+ optional ``image_data.json``)
or BLIP's ``vg_caption.json`` list; one sample per image with its region phrases as captions."""
from pathlib import Path

from . import download, local
from .annotations import (Parsed, describe, image_candidates, load_json, parse_image_caption_list,
                          require_dir, split_of_filename)
from .captions import clean_captions
from .errors import DataPrepError
from .reasons import BAD_ROW, EMPTY_CAPTION

NAME = "vg"
HELP = "Visual Genome region descriptions (official or BLIP vg_caption.json) with local images"
EXPECTED = ("Visual Genome annotations: region_descriptions.json [{'id', 'regions': [{'phrase', ...}]}] "
            "or BLIP's vg_caption.json [{'image': ..., 'caption': ...}]")
EXPECTED_IMAGE_DATA = "Visual Genome image_data.json [{'image_id', 'url', 'width', 'height'}]"
SUBDIRS = ("VG_100K", "VG_100K_2")  # what images.zip and images2.zip unpack to
_VG = "https://homes.cs.washington.edu/~ranjay/visualgenome/data/dataset"
# Visual Genome publishes no checksums.
DOWNLOADS = [
    download.Remote(f"{_VG}/region_descriptions.json.zip", extract=True),
    download.Remote(f"{_VG}/image_data.json.zip", extract=True),
    download.Remote("https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip", extract=True),
    download.Remote("https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip", extract=True),
]


def _image_paths(image_data_file) -> dict:
    """image id -> path relative to the image root, from ``image_data.json`` URLs
    (``.../VG_100K_2/1.jpg`` -> ``VG_100K_2/1.jpg``)."""
    data = load_json(image_data_file, EXPECTED_IMAGE_DATA)
    if not isinstance(data, list):
        raise DataPrepError(f"{image_data_file}: expected {EXPECTED_IMAGE_DATA}; found {describe(data)}")
    paths = {}
    for entry in data:
        if isinstance(entry, dict) and isinstance(entry.get("url"), str):
            image_id = entry.get("image_id", entry.get("id"))
            paths[image_id] = "/".join(entry["url"].rstrip("/").split("/")[-2:])
    return paths


def parse_regions(data: list, images_dir: Path, image_paths: dict, max_words: int) -> Parsed:
    """``[{"id": image_id, "regions": [{"phrase", "image_id", ...}]}]``: one row per image."""
    out = Parsed()
    for n, entry in enumerate(data):
        regions = entry.get("regions") if isinstance(entry, dict) else None
        image_id = None
        if isinstance(entry, dict):
            image_id = entry.get("id", entry.get("image_id"))
            if image_id is None and regions and isinstance(regions[0], dict):
                image_id = regions[0].get("image_id")
        if not isinstance(regions, list) or image_id is None:
            out.fail(BAD_ROW, f"entry {n}: expected {{'id', 'regions': [...]}}, got {str(entry)[:80]}")
            continue
        caps = clean_captions([r.get("phrase") for r in regions if isinstance(r, dict)], max_words)
        if not caps:
            out.fail(EMPTY_CAPTION, f"entry {n}: image {image_id}")
            continue
        rel = image_paths.get(image_id, f"{image_id}.jpg")
        out.rows.append(local.ImageRow(image_candidates(images_dir, rel, SUBDIRS), tuple(caps), image_id, "train"))
    return out


def parse(path, images_dir: Path, image_data, max_words: int) -> Parsed:
    data = load_json(path, EXPECTED)
    first = next((e for e in data if isinstance(e, dict)), {}) if isinstance(data, list) else {}
    if "regions" in first:
        paths = _image_paths(image_data) if image_data else {}
        return parse_regions(data, images_dir, paths, max_words)
    if "image" in first:
        return parse_image_caption_list(data, images_dir, split_of_filename(path), max_words, SUBDIRS)
    raise DataPrepError(f"{path}: expected {EXPECTED}; found {describe(data)}")


def add_arguments(parser) -> None:
    local.add_image_arguments(parser, "region_descriptions.json or BLIP's vg_caption.json")
    parser.add_argument("--image-data", metavar="FILE",
                        help="image_data.json, to find each image in VG_100K/ or VG_100K_2/ (optional)")
    download.add_arguments(parser)


def run(args) -> dict:
    if args.download:
        cache = download.fetch_all(DOWNLOADS, download.cache_dir_of(args), args.mirror, not args.no_progress)
        args.annotations = args.annotations or str(cache / "region_descriptions.json")
        args.image_data = args.image_data or str(cache / "image_data.json")
        args.images = args.images or str(cache)
    if not args.annotations or not args.images:
        raise DataPrepError("vg needs --annotations FILE and --images DIR (or --download)")
    images_dir = require_dir(args.images, "the Visual Genome image directory (holding VG_100K/, VG_100K_2/)")
    parsed = parse(args.annotations, images_dir, args.image_data, args.max_words)
    inputs = [args.annotations] + ([args.image_data] if args.image_data else [])
    return local.build(args, NAME, parsed, "train", inputs)
