"""Sources whose images are local files (COCO, Visual Genome, Flickr30k)."""
import os
from pathlib import Path

from . import writer
from .annotations import EVAL_SPLITS, ImageRow, Parsed, expand_per_caption
from .images import prepare_image
from .reasons import MISSING_FILE, Skip


def read_local_image(paths, image_size: int, resize_mode: str, min_image_size: int):
    """The first of ``paths`` that exists, read and validated/resized by :func:`prepare_image`:
    ``(path, (jpg, original_size, stored_size))``. A missing or unreadable file, or a bad image,
    is a :class:`Skip` naming the path."""
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        raise Skip(MISSING_FILE, paths[0])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise Skip(MISSING_FILE, f"{path}: {err.strerror}") from None
    try:
        return path, prepare_image(data, image_size, resize_mode, min_image_size)
    except Skip as skip:
        raise Skip(skip.reason, f"{path}: {skip.detail}") from None


class LocalSampler:
    """Picklable ``make_sample``: read the image file, validate/resize it, attach captions."""

    def __init__(self, source: str, image_size: int, resize_mode: str, min_image_size: int):
        self.source, self.image_size = source, image_size
        self.resize_mode, self.min_image_size = resize_mode, min_image_size

    def __call__(self, row_index: int, row: ImageRow) -> dict:
        path, (jpg, original, stored) = read_local_image(row.paths, self.image_size, self.resize_mode,
                                                         self.min_image_size)
        return {"jpg": jpg, "txt": row.captions[row.caption_index],
                "json": {"source": self.source, "image_id": row.image_id, "original_size": list(original),
                         "size": list(stored), "captions": list(row.captions), "split": row.split,
                         "file": os.path.basename(path)}}


def add_image_arguments(parser, annotations_help: str) -> None:
    """``--annotations`` / ``--images`` / ``--split`` / ``--per-caption`` of local sources."""
    parser.add_argument("--annotations", help=annotations_help)
    parser.add_argument("--images", help="directory holding the images (paths in the annotations "
                                         "are resolved against it, falling back to the file name)")
    parser.add_argument("--per-caption", action="store_true",
                        help="one sample per caption, as ALBEF counts an epoch (default: one per image "
                             "with all captions in KEY.json, KEY.txt = the first)")


def build(args, source: str, parsed: Parsed, split: str, input_files: list) -> dict:
    """Shard ``parsed`` rows of a local source according to the common options in ``args``."""
    is_eval = split in EVAL_SPLITS
    rows = expand_per_caption(parsed.rows) if args.per_caption and not is_eval else parsed.rows
    prefix = args.prefix or (source if split in ("train", "all") else f"{source}_{split}")
    fingerprint = {
        "inputs": [[str(Path(p).resolve()), Path(p).stat().st_size] for p in input_files],
        "images": str(Path(args.images).resolve()), "split": split, "per_caption": bool(args.per_caption),
        "max_words": args.max_words, "image_size": args.image_size, "resize_mode": args.resize_mode,
        "min_image_size": args.min_image_size,
    }
    sampler = LocalSampler(source, args.image_size, args.resize_mode, args.min_image_size)
    return writer.write_dataset(
        args.out, prefix, source, rows, sampler, shard_size=args.shard_size, fingerprint=fingerprint,
        parse_failures=parsed.failures, parse_examples=parsed.examples, extra={"split": split, "eval": is_eval},
        workers=args.workers or os.cpu_count() or 1, overwrite=args.overwrite, min_shards=args.min_shards,
        show_progress=not args.no_progress, part=args.part)
