"""A procedurally drawn image-caption dataset a tiny model can learn.

Each image shows one or two groups of identical shapes, each group in its own quadrant;
the captions say what is where: "two red circles at the top left and a blue square at the
bottom right". The vocabulary is small (3 shapes, 6 colours, 4 positions, counts 1-3) and
every word is tied to something visible at 64-96 px, so image-text matching is learnable
and different images are distinguishable (over 40 000 compositions), which makes
retrieval above chance possible. Everything is a pure function of (seed, split, index).

``distractors=N`` adds up to N groups the captions never mention, in the quadrants the
described groups leave free: an image then holds more than its caption says, so which
tokens a model keeps matters (dropping the described shapes' patches loses the match, and
the text has something to point at), as in ELIP's premise that much of an image is
irrelevant to its caption.
"""
import io
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

from . import writer
from .errors import DataPrepError
from .captions import DEFAULT_MAX_WORDS, pre_caption

NAME = "synthetic"
HELP = "procedurally drawn shapes with captions describing them (demo and tests)"

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
           "yellow": (235, 200, 30), "purple": (140, 60, 190), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = {1: ("a", "one"), 2: ("two",), 3: ("three",)}
BACKGROUND = (235, 235, 235)


def _group_phrase(g: dict, variant: int) -> str:
    words = COUNT_WORDS[g["count"]]
    noun = g["shape"] + ("s" if g["count"] > 1 else "")
    return f"{words[variant % len(words)]} {g['colour']} {noun}"


def _caption(groups: list[dict], template: int, variant: int = 0) -> str:
    """One of five paraphrases; all name the same counts, colours, shapes and positions.
    ``variant`` switches "a" / "one" for single shapes."""
    order = groups if template % 2 == 0 else groups[::-1]
    parts = [(_group_phrase(g, variant), g["position"]) for g in order]
    if template == 0:
        return " and ".join(f"{p} at the {pos}" for p, pos in parts)
    if template == 1:
        return " and ".join(f"{p} in the {pos}" for p, pos in parts)
    if template == 2:
        return "a picture of " + " and ".join(f"{p} at the {pos}" for p, pos in parts)
    if template == 3:
        return " and ".join(f"at the {pos} {p}" for p, pos in parts)
    return "an image with " + " and ".join(f"{p} in the {pos}" for p, pos in parts)


NUM_TEMPLATES = 5


def _rng(seed: int, split: str, index: int) -> random.Random:
    # String seeds are hashed with SHA-512 by random.Random: stable across runs and
    # platforms, and the train and eval splits of one seed never share images.
    return random.Random(f"elip-synthetic/{seed}/{split}/{index}")


def _random_group(rng: random.Random, position: str) -> dict:
    return {"shape": rng.choice(SHAPES), "colour": rng.choice(sorted(COLOURS)),
            "count": rng.choice((1, 2, 3)), "position": position}


def compose(seed: int, index: int, split: str = "train") -> list[dict]:
    """The groups of sample ``index``: ``[{"shape", "colour", "count", "position"}]``."""
    rng = _rng(seed, split, index)
    positions = rng.sample(POSITIONS, 2 if rng.random() < 0.65 else 1)
    return [_random_group(rng, pos) for pos in positions]


def compose_distractors(seed: int, index: int, groups: list[dict], n: int, split: str = "train") -> list[dict]:
    """Up to ``n`` unmentioned groups in the quadrants ``groups`` leave free (fewer when fewer
    are free). A separate random stream: the described groups do not depend on ``n``."""
    rng = _rng(seed, split + "/distractors", index)
    free = [p for p in POSITIONS if p not in {g["position"] for g in groups}]
    return [_random_group(rng, pos) for pos in rng.sample(free, min(n, len(free)))]


def draw(groups: list[dict], image_size: int = 96, rng: random.Random | None = None,
         image: Image.Image | None = None) -> Image.Image:
    """Draw ``groups`` on a ``image_size`` square canvas (or onto ``image``); ``rng`` jitters
    sizes and places."""
    rng = rng or random.Random(0)
    im = image if image is not None else Image.new("RGB", (image_size, image_size), BACKGROUND)
    d = ImageDraw.Draw(im)
    half = image_size / 2
    cell = half / 2  # each quadrant holds a 2x2 grid of slots, one shape per slot
    for g in groups:
        qx = half if "right" in g["position"] else 0.0
        qy = half if "bottom" in g["position"] else 0.0
        colour = COLOURS[g["colour"]]
        for slot in rng.sample(range(4), g["count"]):
            size = cell * rng.uniform(0.55, 0.8)
            x0 = qx + (slot % 2) * cell + rng.uniform(0, cell - size)
            y0 = qy + (slot // 2) * cell + rng.uniform(0, cell - size)
            box = (x0, y0, x0 + size, y0 + size)
            if g["shape"] == "circle":
                d.ellipse(box, fill=colour)
            elif g["shape"] == "square":
                d.rectangle(box, fill=colour)
            else:
                d.polygon([(x0 + size / 2, y0), (x0 + size, y0 + size), (x0, y0 + size)], fill=colour)
    return im


def make_example(seed: int, index: int, image_size: int = 96, captions_per_image: int = 1,
                 split: str = "train", distractors: int = 0) -> tuple[Image.Image, list[str], list[dict]]:
    """Return ``(image, captions, groups)`` of sample ``index`` without writing anything.

    ``groups`` are the described groups; with ``distractors`` the image also holds
    :func:`compose_distractors`' groups, which no caption mentions."""
    groups = compose(seed, index, split)
    unmentioned = compose_distractors(seed, index, groups, distractors, split) if distractors else []
    rng = _rng(seed, split + "/draw", index)
    image = draw(groups, image_size, rng)
    if unmentioned:  # its own stream: the described shapes and the captions stay as without distractors
        draw(unmentioned, image_size, _rng(seed, split + "/draw-distractors", index), image)
    if captions_per_image <= 1:
        templates = [rng.randrange(NUM_TEMPLATES)]
    else:
        first = rng.randrange(NUM_TEMPLATES)
        templates = [(first + k) % NUM_TEMPLATES for k in range(captions_per_image)]
    # beyond five captions, "a" becomes "one" so that captions stay distinct where possible
    captions = [_caption(groups, t, k // NUM_TEMPLATES) for k, t in enumerate(templates)]
    return image, captions, groups


class SyntheticSampler:
    """Picklable ``make_sample`` for :func:`data_prep.writer.write_dataset`."""

    def __init__(self, seed, image_size, captions_per_image, split, max_words, distractors=0):
        self.seed, self.image_size, self.split = seed, image_size, split
        self.captions_per_image, self.max_words = captions_per_image, max_words
        self.distractors = distractors

    def __call__(self, row_index: int, index: int) -> dict:
        image, captions, groups = make_example(self.seed, index, self.image_size,
                                               self.captions_per_image, self.split, self.distractors)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        captions = [pre_caption(c, self.max_words) for c in captions]
        meta = {"source": NAME, "image_id": index, "original_size": list(image.size),
                "captions": captions, "split": self.split, "objects": groups}
        if self.distractors:
            meta["distractors"] = compose_distractors(self.seed, index, groups, self.distractors, self.split)
        return {"jpg": buf.getvalue(), "txt": captions[0], "json": meta}


def build(out_dir, num: int, seed: int = 0, image_size: int = 96, shard_size: int = 1000,
          captions_per_image: int = 1, split: str = "train", prefix: str | None = None,
          workers: int = 1, max_words: int = DEFAULT_MAX_WORDS, min_shards: int = 64,
          overwrite: bool = False, show_progress: bool = False, part: writer.Part = writer.Part(),
          distractors: int = 0) -> dict:
    """Write ``num`` synthetic samples as shards under ``out_dir``; return the manifest.

    ``split="test"`` (or any name other than ``train``) draws a disjoint set of images and
    marks the set as an evaluation set; use ``captions_per_image=5`` for Karpathy-style
    retrieval evaluation. Default prefix: ``synthetic`` for train, ``synthetic_SPLIT`` else.
    ``part``: write only that task's shards (``--part I/N``, see :class:`data_prep.writer.Part`).
    ``distractors``: unmentioned groups per image, at most 3 (:func:`compose_distractors`).
    """
    if not 0 <= distractors <= len(POSITIONS) - 1:
        raise DataPrepError(f"--distractors must be in [0, {len(POSITIONS) - 1}] (free quadrants), got {distractors}")
    if num < 1:
        raise DataPrepError(f"--num must be at least 1, got {num}")
    if image_size < 16:
        raise DataPrepError(f"--image-size must be at least 16 px, got {image_size}")
    prefix = prefix or (NAME if split == "train" else f"{NAME}_{split}")
    fingerprint = {"seed": seed, "image_size": image_size, "captions_per_image": captions_per_image,
                   "split": split, "max_words": max_words}
    if distractors:  # absent at 0, so that sets written before the option keep their fingerprint
        fingerprint["distractors"] = distractors
    sampler = SyntheticSampler(seed, image_size, captions_per_image, split, max_words, distractors)
    return writer.write_dataset(Path(out_dir), prefix, NAME, range(num), sampler, shard_size=shard_size,
                                fingerprint=fingerprint, extra={"split": split, "eval": split != "train"},
                                workers=workers, overwrite=overwrite, min_shards=min_shards,
                                show_progress=show_progress, part=part)


def add_arguments(parser) -> None:
    parser.add_argument("--num", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=96, help="square image side in px (default 96)")
    parser.add_argument("--eval", action="store_true",
                        help="write an evaluation set: disjoint images (split 'test'), "
                             "--captions-per-image defaults to 5")
    parser.add_argument("--captions-per-image", type=int, default=None,
                        help="captions kept in KEY.json (default 1, or 5 with --eval)")
    parser.add_argument("--distractors", type=int, default=0,
                        help="up to this many unmentioned shape groups per image, in the quadrants the "
                             "described ones leave free (0-3; default 0): the caption describes only part "
                             "of the image")


def run(args) -> dict:
    split = "test" if args.eval else "train"
    cpi = args.captions_per_image or (5 if args.eval else 1)
    return build(args.out, args.num, seed=args.seed, image_size=args.image_size, shard_size=args.shard_size,
                 captions_per_image=cpi, split=split, prefix=args.prefix,
                 workers=args.workers or (1 if args.num < 20000 else os.cpu_count() or 1),
                 max_words=args.max_words, min_shards=args.min_shards, overwrite=args.overwrite,
                 show_progress=not args.no_progress, part=args.part, distractors=args.distractors)
