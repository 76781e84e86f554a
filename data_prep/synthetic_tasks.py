"""Synthetic downstream sets drawn like :mod:`data_prep.synthetic`, so tiny models can learn
VQA, NLVR2 and SNLI-VE on CPU. Each sample is a pure function of (seed, split, index); the shard
schema is the real sets' (:mod:`data_prep.vqav2`, :mod:`data_prep.nlvr2`, :mod:`data_prep.snli_ve`).

- ``synthetic_vqa``: one question per image, five kinds drawn uniformly: "how many circles are
  there?" -> "two" (number), "what colour is the square?" -> "red", "what shape is at the top
  left?" -> "circle", "where is the blue triangle?" -> "bottom right" (other), "is there a
  triangle?" -> "yes"/"no" (yes/no, half and half). ``answers`` holds ten copies of the answer,
  so the VQA accuracy (``pipeline.eval.vqa_metric``) applies unchanged.
- ``synthetic_nlvr2``: two images and a statement about the pair ("the left image has more
  circles than the right image", "both images contain a square", "exactly one image contains
  something red", ...); the label is drawn first (true/false half and half), then a statement
  of a random kind that has that truth value for this pair.
- ``synthetic_ve``: one image and a hypothesis; the label is drawn uniformly from entailment /
  neutral / contradiction. Entailment and contradiction use the same templates ("there are two
  red circles", "the blue square is at the top left", "there is no triangle") filled truly or
  falsely, so only the image tells them apart; neutral hypotheses claim what a drawing cannot
  show ("the red circle is made of paper"), which the text alone reveals: a text-only model
  reaches about 2/3, chance is 1/3.

The manifest records each set's ``chance`` (the share of its most frequent answer or label) and
``text_only`` (the share that each text's most frequent answer in 10 000 other samples gets
right): the texts carry some of the answer (a "how many" question is rarely "six", "is there"
is yes or no), so learning *from the images* shows as a score above ``text_only``. On 3 000
test samples: text only VQA 35% (chance 11%), NLVR2 57% (50%), SNLI-VE 67% (33%).
"""
import io
import os
import random
from collections import Counter, defaultdict
from pathlib import Path

from . import synthetic, writer
from .errors import DataPrepError

COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
# what a drawing cannot show: neutral for visual entailment
UNSEEN = (("is made of paper", "are made of paper"), ("was drawn first", "were drawn first"),
          ("is heavy", "are heavy"), ("belongs to a child", "belong to a child"),
          ("was bought yesterday", "were bought yesterday"))  # (singular, plural)


def _rng(seed: int, task: str, split: str, index: int, part: str) -> random.Random:
    return random.Random(f"elip-synthetic-{task}/{seed}/{split}/{index}/{part}")


def _groups(seed, task, split, index, side=""):
    # the task and side in the split name give each set and each image of a pair its own draws
    return synthetic.compose(seed, index, f"{task}{side}/{split}")


def _count(groups, shape=None, colour=None) -> int:
    return sum(g["count"] for g in groups if (shape is None or g["shape"] == shape)
               and (colour is None or g["colour"] == colour))


def _noun(shape: str, n: int) -> str:
    return shape + ("s" if n != 1 else "")


# ------------------------------------------------------------------------------------- VQA


def vqa_question(groups: list, rng: random.Random) -> tuple[str, str, str, str]:
    """``(question, answer, question_type, answer_type)`` about ``groups``."""
    kind = rng.choice(("count", "colour", "shape", "where", "exists"))
    g = rng.choice(groups)
    if kind == "count":
        shape = rng.choice(synthetic.SHAPES)
        return f"how many {shape}s are there?", COUNT_WORDS[_count(groups, shape)], "how many", "number"
    if kind == "colour":
        return (f"what colour {'is the' if g['count'] == 1 else 'are the'} {_noun(g['shape'], g['count'])} "
                f"at the {g['position']}?", g["colour"], "what colour", "other")
    if kind == "where" and sum(x["shape"] == g["shape"] and x["colour"] == g["colour"] for x in groups) > 1:
        kind = "shape"  # two groups of the same colour and shape: "where" would have two answers
    if kind == "shape":
        return f"what shape is at the {g['position']}?", g["shape"], "what shape", "other"
    if kind == "where":
        return (f"where {'is the' if g['count'] == 1 else 'are the'} {g['colour']} "
                f"{_noun(g['shape'], g['count'])}?", g["position"], "where", "other")
    present = {x["shape"] for x in groups}
    want_yes = rng.random() < 0.5
    pool = sorted(present) if want_yes else [s for s in synthetic.SHAPES if s not in present]
    shape = rng.choice(pool or synthetic.SHAPES)
    return f"is there a {shape}?", "yes" if shape in present else "no", "is there", "yes/no"


def vqa_example(seed: int, index: int, split: str = "train") -> dict:
    """Groups and question of ``synthetic_vqa`` sample ``index`` (no drawing)."""
    groups = _groups(seed, "vqa", split, index)
    q, a, qtype, atype = vqa_question(groups, _rng(seed, "vqa", split, index, "question"))
    return {"groups": {"jpg": groups}, "text": q, "target": a,
            "meta": {"task": "vqa", "dataset": "synthetic_vqa", "question_id": index, "question": q,
                     "answers": [a] * 10, "answer_type": atype, "question_type": qtype, "image_id": index}}


# ----------------------------------------------------------------------------------- NLVR2


def nlvr2_statements(left: list, right: list) -> list[list[tuple[str, bool]]]:
    """All statements about the pair, grouped by kind: ``[[(statement, truth), ...], ...]``."""
    kinds = []
    more = []
    for shape in synthetic.SHAPES:
        cl, cr = _count(left, shape), _count(right, shape)
        more += [(f"the left image has more {shape}s than the right image", cl > cr),
                 (f"the right image has more {shape}s than the left image", cr > cl)]
    kinds.append(more)
    kinds.append([(f"both images contain a {s}", _count(left, s) > 0 and _count(right, s) > 0)
                  for s in synthetic.SHAPES])
    kinds.append([(f"exactly one image contains something {c}",
                   (_count(left, colour=c) > 0) != (_count(right, colour=c) > 0)) for c in sorted(synthetic.COLOURS)])
    kinds.append([(f"there {'is' if n == 1 else 'are'} {COUNT_WORDS[n]} {_noun(s, n)} in total",
                   _count(left, s) + _count(right, s) == n) for s in synthetic.SHAPES for n in range(1, 7)])
    return kinds


def nlvr2_example(seed: int, index: int, split: str = "train") -> dict:
    """Groups of both images, statement and label of ``synthetic_nlvr2`` sample ``index``."""
    left, right = _groups(seed, "nlvr2", split, index, "-left"), _groups(seed, "nlvr2", split, index, "-right")
    rng = _rng(seed, "nlvr2", split, index, "statement")
    label = rng.random() < 0.5
    kinds = nlvr2_statements(left, right)
    rng.shuffle(kinds)
    # the first kind (in random order) that can say something with this truth value
    statement = next(rng.choice(m) for m in ([s for s, t in k if t == label] for k in kinds) if m)
    return {"groups": {"left.jpg": left, "right.jpg": right}, "text": statement, "target": label,
            "meta": {"task": "nlvr2", "label": label, "identifier": f"synthetic-{split}-{index}",
                     "sentence": statement}}


# ---------------------------------------------------------------------------------- SNLI-VE

VE_LABELS = ("entailment", "neutral", "contradiction")


def ve_hypothesis(groups: list, label: str, rng: random.Random) -> str:
    """A hypothesis about ``groups`` with ``label``'s relation to the image."""
    g = rng.choice(groups)
    phrase = f"{g['colour']} {_noun(g['shape'], g['count'])}"
    if label == "neutral":
        return f"the {phrase} {rng.choice(UNSEEN)[g['count'] != 1]}"
    true = label == "entailment"
    kind = rng.choice(("count", "where", "absent"))
    if kind == "count":
        n = g["count"] if true else rng.choice([c for c in (1, 2, 3) if c != g["count"]])
        return f"there {'is' if n == 1 else 'are'} {COUNT_WORDS[n]} {g['colour']} {_noun(g['shape'], n)}"
    if kind == "where":
        taken = {x["position"] for x in groups}
        pos = g["position"] if true else rng.choice([p for p in synthetic.POSITIONS if p not in taken])
        return f"the {phrase} {'is' if g['count'] == 1 else 'are'} at the {pos}"
    present = {x["shape"] for x in groups}
    absent = [s for s in synthetic.SHAPES if s not in present]
    if true and absent:
        return f"there is no {rng.choice(absent)}"
    if true:  # every shape is present: say so instead
        return f"there is a {g['shape']}"
    return f"there is no {g['shape']}"


def ve_example(seed: int, index: int, split: str = "train") -> dict:
    """Groups, hypothesis and label of ``synthetic_ve`` sample ``index``."""
    groups = _groups(seed, "ve", split, index)
    rng = _rng(seed, "ve", split, index, "hypothesis")
    label = VE_LABELS[rng.randrange(3)]
    hyp = ve_hypothesis(groups, label, rng)
    return {"groups": {"jpg": groups}, "text": hyp, "target": label,
            "meta": {"task": "snli_ve", "label": label, "label_id": VE_LABELS.index(label), "hypothesis": hyp,
                     "image_id": index}}


# ------------------------------------------------------------------------------ shard writing

EXAMPLES = {"vqa": vqa_example, "nlvr2": nlvr2_example, "ve": ve_example}


class TaskSampler:
    """Picklable ``make_sample``: draw the example's image(s) and attach its text and fields."""

    def __init__(self, task: str, seed: int, split: str, image_size: int):
        self.task, self.seed, self.split, self.image_size = task, seed, split, image_size

    def __call__(self, row_index: int, index: int) -> dict:
        ex = EXAMPLES[self.task](self.seed, index, self.split)
        sample = {}
        for ext, groups in ex["groups"].items():
            image = synthetic.draw(groups, self.image_size, _rng(self.seed, self.task, self.split, index, "draw" + ext))
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=90)
            sample[ext] = buf.getvalue()
        size = [self.image_size, self.image_size]
        two = len(ex["groups"]) == 2
        sample["txt"] = ex["text"]
        sample["json"] = {**ex["meta"], "source": f"synthetic_{self.task}", "split": self.split,
                          "objects": ex["groups"] if two else ex["groups"]["jpg"],
                          "original_size": {"left": size, "right": size} if two else size}
        return sample


TEXT_PRIOR_SAMPLES = 10_000  # enough for every synthetic text to be seen many times


def baselines(task: str, num: int, seed: int = 0, split: str = "train") -> dict:
    """What needs no image, over the ``num`` samples of ``task``: ``chance``, the share of the most
    frequent answer / label, and ``text_only``, the share of them that the most frequent answer
    of the same text in 10 000 other samples (a split of their own) gets right: about what a
    model reading only the question, statement or hypothesis can reach."""
    prior: dict = defaultdict(Counter)
    for i in range(TEXT_PRIOR_SAMPLES):
        ex = EXAMPLES[task](seed, i, "text-prior")
        prior[ex["text"]][ex["target"]] += 1
    fallback = sum(prior.values(), Counter()).most_common(1)[0][0]
    targets, hits = Counter(), 0
    for i in range(num):
        ex = EXAMPLES[task](seed, i, split)
        targets[ex["target"]] += 1
        guess = prior[ex["text"]].most_common(1)[0][0] if ex["text"] in prior else fallback
        hits += guess == ex["target"]
    return {"chance": max(targets.values()) / num, "text_only": hits / num}


def build(task: str, out_dir, num: int, seed: int = 0, image_size: int = 96, shard_size: int = 1000,
          split: str = "train", prefix: str | None = None, workers: int = 1, min_shards: int = 64,
          overwrite: bool = False, show_progress: bool = False, part: writer.Part = writer.Part()) -> dict:
    """Write ``num`` samples of ``task`` (``vqa``, ``nlvr2``, ``ve``) under ``out_dir``; return the
    manifest. ``split="test"`` draws disjoint images and marks an evaluation set. Default prefix:
    ``synthetic_TASK`` for train, ``synthetic_TASK_SPLIT`` else."""
    if num < 1:
        raise DataPrepError(f"--num must be at least 1, got {num}")
    if image_size < 16:
        raise DataPrepError(f"--image-size must be at least 16 px, got {image_size}")
    name = f"synthetic_{task}"
    prefix = prefix or (name if split == "train" else f"{name}_{split}")
    real_task = {"ve": "snli_ve"}.get(task, task)
    return writer.write_dataset(
        Path(out_dir), prefix, name, range(num), TaskSampler(task, seed, split, image_size), shard_size=shard_size,
        fingerprint={"seed": seed, "image_size": image_size, "split": split, "task": task},
        extra={"split": split, "eval": split != "train", "task": real_task, **baselines(task, num, seed, split)},
        workers=workers, overwrite=overwrite, min_shards=min_shards, show_progress=show_progress, part=part)


class _Source:
    """One ``python -m data_prep synthetic_TASK`` command (the interface of a source module)."""

    def __init__(self, task: str, help_: str):
        self.task, self.NAME, self.HELP = task, f"synthetic_{task}", help_
        self.__doc__ = __doc__

    def add_arguments(self, parser) -> None:
        parser.add_argument("--num", type=int, required=True, help="number of samples")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--image-size", type=int, default=96, help="square image side in px (default 96)")
        parser.add_argument("--eval", action="store_true",
                            help="write an evaluation set: disjoint images (split 'test')")

    def run(self, args) -> dict:
        m = build(self.task, args.out, args.num, seed=args.seed, image_size=args.image_size,
                  shard_size=args.shard_size, split="test" if args.eval else "train", prefix=args.prefix,
                  workers=args.workers or (1 if args.num < 20000 else os.cpu_count() or 1),
                  min_shards=args.min_shards, overwrite=args.overwrite, show_progress=not args.no_progress,
                  part=args.part)
        for prefix, src in m["sources"].items():
            if src["source"] == self.NAME and src.get("chance") is not None:
                print(f"{prefix}: {src['num_samples']} samples, chance level {100 * src['chance']:.1f}% "
                      f"(most frequent answer or label), text only {100 * src['text_only']:.1f}% "
                      "(most frequent answer or label of each text)")
        return m


SOURCES = (_Source("vqa", "synthetic shapes with questions and short answers (VQA schema)"),
           _Source("nlvr2", "pairs of synthetic images with true/false statements (NLVR2 schema)"),
           _Source("ve", "synthetic images with entailment/neutral/contradiction hypotheses (SNLI-VE schema)"))
