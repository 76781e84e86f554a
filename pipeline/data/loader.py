"""webdataset loading for pre-training (the open_clip way) and for evaluation.

Training stream of one dataloader worker (``TrainLoader``)::

    shards  -- epoch passes over all shards, each pass shuffled by (seed, epoch, pass), the
               same on every rank; or, resampled, shards drawn with replacement by weight
    split   -- by node (rank::world) then by worker (w::workers)   [not when resampled]
    tar     -- tar members grouped into samples; a broken tar is skipped and counted, a shard
               shorter than its manifest (or, without one, cut short) is logged by name and
               its missing samples counted (``tars.ShardReader``)
    shuffle -- sample buffer shuffle seeded by (seed, epoch, rank, worker)
    number  -- each raw sample gets its index in this worker's stream
    skip    -- resume: drop the raw samples this worker had already delivered (no decoding)
    decode  -- PIL decode (reduced-size for JPEGs when the crop allows), ALBEF train
               transforms (each image of an NLVR2 pair augmented on its own), caption
               cleaning; a corrupt sample, or a pair missing one image, is skipped and
               counted; the caption choice and augmentation draw from per-sample generators
    batch   -- full batches of ``data.batch_size``; uint8 images stacked, then normalised at once
    take    -- this worker's share of the epoch's batches

Every rank yields the same number of batches per epoch, ``num_samples // (world * batch)``
(rounded down to a multiple of the gradient accumulation), repeating data when a rank's
shards run short. The order of an epoch is a pure function of (seed, epoch, rank, worker
count), so resuming is fast-forwarding: each batch carries its worker's raw stream position
(``batch["__meta__"]``), :class:`LoaderPosition` records it, and the next run skips exactly
that many raw samples per worker and starts the round-robin at the right worker.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from itertools import count, islice
from typing import Any, Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import _shuffle

from .shards import parse_shard_spec, shard_weights, total_samples
from .tars import ShardReader
from .transforms import TrainTransform, decode_image, eval_transform, normalize, pre_caption

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
PAIR_SIDES = ("left", "right")  # NLVR2 samples: KEY.left.jpg, KEY.right.jpg (data_prep nlvr2, synthetic_nlvr2)


# --------------------------------------------------------------------------- errors


class SkipCounter:
    """webdataset error handler: count the error, log at a limited rate, keep going."""

    def __init__(self, what: str = "sample", log_interval_s: float = 30.0):
        self.what = what
        self.count = 0
        self.log_interval_s = log_interval_s
        self._last_log = -float("inf")
        self._logged_count = 0

    def add(self, n: int) -> None:
        """Count ``n`` lost samples reported elsewhere (a short shard names itself)."""
        self.count += n

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        now = time.monotonic()
        if self.count == 1 or now - self._last_log >= self.log_interval_s:
            extra = self.count - self._logged_count - 1
            log.warning("skipped a broken %s or shard (%d in this reader's epoch%s): %r", self.what, self.count,
                        f", {extra} not shown" if extra > 0 else "", exn)
            self._last_log = now
            self._logged_count = self.count
        return True  # continue with the next sample / shard


# --------------------------------------------------------------------------- stages


def _seed_of(*parts: Any) -> int:
    digest = hashlib.blake2b("-".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class _Progress:
    """Guard against spinning forever over shards that yield nothing."""

    def __init__(self, limit: int):
        self.limit = limit
        self.urls_since_sample = 0

    def urls(self, src):
        for item in src:
            self.urls_since_sample += 1
            if self.urls_since_sample > self.limit:
                raise RuntimeError(f"no readable sample in the last {self.limit} shards; are the shards empty or broken?")
            yield item

    def samples(self, src):
        for sample in src:
            self.urls_since_sample = 0
            yield sample


def _shard_order(urls: list[str], seed: int, epoch: int, p: int) -> list[str]:
    """Pass ``p`` of ``epoch`` over all shards, shuffled by (seed, epoch, p): the same on every rank."""
    order = list(urls)
    random.Random(_seed_of("shards", seed, epoch, p)).shuffle(order)
    return order


def _shard_slice(order: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[dict]:
    """split_by_node then split_by_worker of one pass."""
    return [dict(url=u) for u in order[rank::world_size][worker::num_workers]]


def shard_assignment(urls: list[str], seed: int, epoch: int, rank: int, world_size: int, worker: int,
                     num_workers: int, p: int = 0) -> list[str]:
    """The shards (rank, worker) reads in pass ``p`` of ``epoch`` (non-resampled mode)."""
    return [d["url"] for d in _shard_slice(_shard_order(urls, seed, epoch, p), rank, world_size, worker, num_workers)]


def _shard_passes(urls: list[str], seed: int, epoch: int) -> Iterator[dict]:
    for p in count():
        for url in _shard_order(urls, seed, epoch, p):
            yield dict(url=url)


def _resampled_shards(urls: list[str], weights: list[float], rng_seed: int) -> Iterator[dict]:
    rng = random.Random(rng_seed)
    while True:
        yield dict(url=rng.choices(urls, weights=weights, k=1)[0])


def _split(src, index: int, count: int):
    """``wds.split_by_node`` / ``wds.split_by_worker`` with the rank / worker given explicitly."""
    return islice(src, index, None, count) if count > 1 else src


def _number(src):
    for i, sample in enumerate(src):
        sample["__raw__"] = i
        yield sample


def _skip(src, n: int):
    return islice(src, n, None) if n > 0 else src


def _take(src, n: int):
    return islice(src, n)


def _captions_of(sample: dict) -> list[str]:
    """All captions of a sample: ``KEY.json``'s ``captions`` (or ``caption``), else ``KEY.txt``."""
    meta = sample.get("json")
    meta = json.loads(meta) if isinstance(meta, (bytes, str)) else (meta or {})
    captions = meta.get("captions") or ([meta["caption"]] if "caption" in meta else [])
    if not captions and "txt" in sample:
        text = sample["txt"]
        captions = [text.decode("utf-8") if isinstance(text, bytes) else str(text)]
    return captions


def _text_of(sample: dict, rng: random.Random) -> str:
    """One caption per visit, drawn from all of a sample's captions (COCO, VG: every caption gets
    used over the epochs)."""
    captions = _captions_of(sample)
    if not captions:
        raise ValueError(f"sample {sample.get('__key__')!r} has no caption (.txt or .json captions)")
    return rng.choice(captions)


def _image_bytes(sample: dict) -> bytes:
    for k in IMAGE_KEYS:
        if k in sample:
            return sample[k]
    raise ValueError(f"sample {sample.get('__key__')!r} has no image ({'/'.join(IMAGE_KEYS)})")


def _frame_bytes(sample: dict) -> list[bytes]:
    """The frames of a video sample (``KEY.0.jpg`` ... ``KEY.{T-1}.jpg``, data_prep's ``video``
    source) in order; empty for an image sample."""
    frames = {}
    for k, v in sample.items():
        index, _, ext = k.partition(".")
        if ext in IMAGE_KEYS and index.isdigit():
            frames[int(index)] = v
    if frames and sorted(frames) != list(range(len(frames))):
        raise ValueError(f"sample {sample.get('__key__')!r}: frames {sorted(frames)} are not 0..{len(frames) - 1}")
    return [frames[i] for i in range(len(frames))]


def _pair_bytes(sample: dict) -> list[bytes]:
    """The two images of an NLVR2 pair sample, left then right; empty for any other sample. A
    pair sample without one of them raises, naming the sample and the missing member."""
    found = {}
    for k, v in sample.items():
        side, _, ext = k.partition(".")
        if side in PAIR_SIDES and ext in IMAGE_KEYS:
            found[side] = v
    missing = [s for s in PAIR_SIDES if s not in found]
    if found and missing:
        raise ValueError(f"pair sample {sample.get('__key__')!r} has no {missing[0]} image "
                         f"(KEY.{missing[0]}.jpg); it has {sorted(k for k in sample if not k.startswith('__'))}")
    return [found[s] for s in PAIR_SIDES] if found else []


def _pixels(sample: dict, transform: Callable) -> torch.Tensor:
    """Evaluation: ``[3, H, W]`` for an image sample, ``[T, 3, H, W]`` for a video sample,
    ``[2, 3, H, W]`` (left, right) for a pair sample."""
    several = _frame_bytes(sample) or _pair_bytes(sample)
    out = [transform(decode_image(data)) for data in several or [_image_bytes(sample)]]
    return torch.stack(out) if several else out[0]


def _augmented(sample: dict, transform: TrainTransform, g: torch.Generator) -> torch.Tensor:
    """Training: uint8 ``[3, S, S]`` for an image sample, ``[T, 3, S, S]`` for a video sample
    (one crop, flip and op list for all frames of a clip), ``[2, 3, S, S]`` for a pair sample
    (left, right)."""
    pair = _pair_bytes(sample)
    if pair:  # two photographs, each with its own crop and ops: ALBEF calls its transform once per image
        return torch.stack([transform([data], g)[0] for data in pair])
    frames = _frame_bytes(sample)
    out = transform(frames or [_image_bytes(sample)], g)
    return out if frames else out[0]


def expected_sizes(sources) -> dict[str, int]:
    """Shard URL -> the samples its manifest lists (shards of unknown size left out)."""
    return {u: n for s in sources for u, n in zip(s.urls, s.sizes) if n is not None}


# --------------------------------------------------------------------------- position


@dataclass
class LoaderPosition:
    """What this rank has consumed: epoch, batches of that epoch, raw position per worker."""

    epoch: int = 0
    batches: int = 0
    num_workers: int = 1
    raw_end: dict[int, int] = field(default_factory=dict)  # logical worker -> raw samples consumed
    errors_epoch: dict[int, int] = field(default_factory=dict)  # logical worker -> errors this epoch
    errors_before: int = 0  # errors of earlier epochs

    @property
    def errors(self) -> int:
        return self.errors_before + sum(self.errors_epoch.values())

    def start_epoch(self, epoch: int, num_workers: int) -> None:
        self.errors_before = self.errors
        self.epoch, self.batches, self.num_workers = epoch, 0, num_workers
        self.raw_end, self.errors_epoch = {}, {}

    def update(self, meta: dict) -> None:
        w = int(meta["worker"])
        self.batches += 1
        self.raw_end[w] = int(meta["raw_end"])
        self.errors_epoch[w] = int(meta["errors"])

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, batches=self.batches, num_workers=self.num_workers,
                    raw_end=dict(self.raw_end), errors_epoch=dict(self.errors_epoch),
                    errors_before=self.errors_before)

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.num_workers = int(state["num_workers"])
        self.raw_end = {int(k): int(v) for k, v in state["raw_end"].items()}
        self.errors_epoch = {int(k): int(v) for k, v in state["errors_epoch"].items()}
        self.errors_before = int(state["errors_before"])


def worker_batches(total: int, num_workers: int, worker: int) -> int:
    """Batches logical ``worker`` delivers out of ``total`` taken round-robin."""
    return total // num_workers + (1 if worker < total % num_workers else 0)


# --------------------------------------------------------------------------- datasets


class _TrainStream(IterableDataset):
    """One epoch of one rank, from a start batch; see the module docstring."""

    def __init__(self, *, urls, expected, weights, resampled, rank, world_size, seed, epoch, num_batches, start_batch,
                 raw_skip, batch_size, shuffle_buffer, transform, max_words):
        super().__init__()
        self.urls, self.expected, self.weights, self.resampled = urls, expected, weights, resampled
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.num_batches, self.start_batch, self.raw_skip = num_batches, start_batch, raw_skip
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.transform, self.max_words = transform, max_words

    def _sample(self, worker: int, sample: dict) -> dict:
        # augmentation = f(seed, epoch, rank, worker, index), drawn from generators of its own
        s = _seed_of("sample", self.seed, self.epoch, self.rank, worker, sample["__raw__"])
        caption = pre_caption(_text_of(sample, random.Random(s)), self.max_words)
        if not caption:
            raise ValueError(f"sample {sample.get('__key__')!r}: empty caption")
        image = _augmented(sample, self.transform, torch.Generator().manual_seed(s))
        meta = sample.get("json")
        meta = json.loads(meta) if isinstance(meta, (bytes, str)) else (meta or {})
        return {"image": image, "text": caption, "meta": meta, "__raw__": sample["__raw__"],
                "__key__": sample["__key__"]}

    def _raw_samples(self, worker: int, num_workers: int, errors: SkipCounter) -> Iterator[dict]:
        """This worker's endless stream of undecoded samples for the epoch (shuffled)."""
        progress = _Progress(limit=2 * len(self.urls) + 2 * self.world_size * num_workers + 8)
        shards = ShardReader(errors, errors.add, self.expected)
        key = (self.seed, self.epoch, self.rank, worker)

        def read(urls, *shuffle_key):
            samples = progress.samples(shards.samples(progress.urls(urls)))
            if self.shuffle_buffer > 1:
                rng = random.Random(_seed_of("buffer", *shuffle_key))
                samples = _shuffle(samples, bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)
            return samples

        if self.resampled:
            yield from read(_resampled_shards(self.urls, self.weights, _seed_of("resample", *key)), *key)
        elif len(self.urls) >= self.world_size * num_workers:
            # Pass by pass: every (rank, worker) reads a disjoint part of each pass, and the sample
            # buffer drains at the end of a pass, so an epoch of balanced shards sees each sample once.
            for p in count():
                mine = _shard_slice(_shard_order(self.urls, self.seed, self.epoch, p),
                                    self.rank, self.world_size, worker, num_workers)
                yield from read(iter(mine), *key, p)
        else:  # fewer shards than readers: slice the endless sequence of passes instead
            passes = _shard_passes(self.urls, self.seed, self.epoch)
            yield from read(_split(_split(passes, self.rank, self.world_size), worker, num_workers), *key)

    def __iter__(self):
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (physical + self.start_batch) % num_workers  # logical worker: round-robin continues
        remaining = (worker_batches(self.num_batches, num_workers, worker)
                     - worker_batches(self.start_batch, num_workers, worker))
        if remaining <= 0:
            return iter(())
        errors = SkipCounter()

        def collate(samples):
            return {
                "image": normalize(torch.stack([s["image"] for s in samples])),
                "text": [s["text"] for s in samples],
                "key": [s["__key__"] for s in samples],
                "meta": [s["meta"] for s in samples],  # KEY.json: a downstream task's label or answers
                "__meta__": {"worker": worker, "raw_end": samples[-1]["__raw__"] + 1, "errors": errors.count},
            }

        stages = [lambda: self._raw_samples(worker, num_workers, errors)]
        skip = self.raw_skip.get(worker, 0)
        stages += [
            _number,  # raw index in this worker's stream: the resume position
            lambda src: _skip(src, skip),
            wds.map(lambda s: self._sample(worker, s), handler=errors),
            wds.batched(self.batch_size, collation_fn=collate, partial=False),
            lambda src: _take(src, remaining),
        ]
        return iter(wds.DataPipeline(*stages))


class TrainLoader:
    """Epochs of training batches for one rank; see the module docstring.

    ``iter_epoch(epoch)`` yields ``{"image": FloatTensor[B, 3, H, W], "text": list[str],
    "key": list[str], "meta": list[dict]}`` (``meta``: each ``KEY.json``; ``image`` is
    ``[B, T, 3, H, W]`` for video samples of T frames, ``[B, 2, 3, H, W]`` for NLVR2 pairs, left
    then right) and keeps :attr:`position` up to date; it continues from the position
    when the position is inside that epoch (after ``position.load_state_dict`` on resume).
    """

    def __init__(self, cfg, *, rank: int = 0, world_size: int = 1, batch_multiple: int = 1):
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        sources, weights = parse_shard_spec(cfg.train_shards, cfg.train_weights)
        if weights is not None and not cfg.resampled:
            raise ValueError("data.train_weights: per-source weights need data.resampled=true "
                             "(without resampling the sources are concatenated)")
        self.sources = sources
        self.urls, self.weights = shard_weights(sources, weights)
        self.expected = expected_sizes(sources)
        num_samples = cfg.train_num_samples or total_samples(sources)
        if not num_samples:
            raise ValueError("data.train_num_samples: the epoch length is unknown (no manifest.json or sizes.json "
                             f"next to {cfg.train_shards!r}); set data.train_num_samples")
        self.num_samples = int(num_samples)
        per_rank = self.num_samples // (world_size * cfg.batch_size)
        per_rank -= per_rank % batch_multiple
        self.batches_per_epoch = max(per_rank, batch_multiple)
        self.num_workers = max(0, int(cfg.workers))
        if not cfg.resampled and len(self.urls) < world_size * max(1, self.num_workers):
            log.warning("%d shards for %d ranks x %d workers: some workers will repeat shards within an epoch",
                        len(self.urls), world_size, max(1, self.num_workers))
        self.transform = TrainTransform(cfg.image_size, cfg.crop_scale, cfg.randaugment, cfg.hflip)
        self.position = LoaderPosition(num_workers=max(1, self.num_workers))

    def _raw_skip(self, epoch: int, start: int, workers: int) -> dict[int, int]:
        pos = self.position
        if start == 0:
            return {}
        if pos.epoch == epoch and pos.num_workers == workers and pos.batches == start:
            return dict(pos.raw_end)
        log.warning("data position: resuming with a different worker count (%d -> %d); skipping an "
                    "estimated number of samples, the order after the resume point is not exact",
                    pos.num_workers, workers)
        return {w: worker_batches(start, workers, w) * self.cfg.batch_size for w in range(workers)}

    def iter_epoch(self, epoch: int) -> Iterator[dict]:
        workers = max(1, self.num_workers)
        pos = self.position
        if pos.epoch != epoch:
            pos.start_epoch(epoch, workers)
        start = pos.batches
        if start >= self.batches_per_epoch:
            return
        raw_skip = self._raw_skip(epoch, start, workers)
        if pos.num_workers != workers:  # re-base the per-worker bookkeeping on the new worker count
            errors = pos.errors
            pos.num_workers, pos.raw_end, pos.errors_epoch, pos.errors_before = workers, dict(raw_skip), {}, errors
        dataset = _TrainStream(
            urls=self.urls, expected=self.expected, weights=self.weights, resampled=self.cfg.resampled, rank=self.rank,
            world_size=self.world_size, seed=self.cfg.seed, epoch=epoch, num_batches=self.batches_per_epoch,
            start_batch=start, raw_skip=raw_skip, batch_size=self.cfg.batch_size,
            shuffle_buffer=self.cfg.shuffle_buffer, transform=self.transform, max_words=self.cfg.max_words)
        loader = wds.WebLoader(
            dataset, batch_size=None, shuffle=False, num_workers=self.num_workers,
            persistent_workers=False,
            # a private generator: creating the loader must not consume the global RNG (resume equality)
            generator=torch.Generator().manual_seed(_seed_of("loader", self.cfg.seed, epoch) % 2**62),
            prefetch_factor=2 if self.num_workers > 0 else None,
        )
        for batch in loader:
            pos.update(batch.pop("__meta__"))
            yield batch


# --------------------------------------------------------------------------- evaluation


class _EvalStream(IterableDataset):
    def __init__(self, urls, expected, rank, world_size, batch_size, transform, max_words):
        super().__init__()
        self.urls, self.expected, self.rank, self.world_size = urls, expected, rank, world_size
        self.batch_size, self.transform, self.max_words = batch_size, transform, max_words

    def _sample(self, sample: dict) -> dict:
        captions = [c for c in (pre_caption(c, self.max_words) for c in _captions_of(sample)) if c]
        if not captions:
            raise ValueError(f"eval sample {sample.get('__key__')!r} has no caption")
        image = _pixels(sample, self.transform)
        meta = sample.get("json")
        meta = json.loads(meta) if isinstance(meta, (bytes, str)) else (meta or {})
        return {"image": image, "captions": captions, "key": sample["__key__"], "meta": meta}

    def __iter__(self):
        errors = SkipCounter("eval sample")

        def collate(samples):
            return {"image": torch.stack([s["image"] for s in samples]),
                    "captions": [s["captions"] for s in samples],
                    "key": [s["key"] for s in samples],
                    "meta": [s["meta"] for s in samples]}

        return iter(wds.DataPipeline(
            lambda: iter([dict(url=u) for u in self.urls]),
            lambda src: _split(src, self.rank, self.world_size),  # split_by_node
            wds.split_by_worker,
            ShardReader(errors, errors.add, self.expected).samples,
            wds.map(self._sample, handler=errors),
            wds.batched(self.batch_size, collation_fn=collate, partial=True),
        ))


def build_eval_loader(shards: str, *, image_size: int, batch_size: int, workers: int = 0, max_words: int = 30,
                      rank: int = 0, world_size: int = 1):
    """Evaluation batches ``{"image": [B, 3, H, W], "captions": list[list[str]], "key": list[str],
    "meta": list[dict]}`` (``meta``: each ``KEY.json``; a downstream task's question and answers)
    (``image`` ``[B, T, 3, H, W]`` for video samples, ``[B, 2, 3, H, W]`` for NLVR2 pairs)
    in shard order, no augmentation; with ``world_size > 1`` each rank reads shards rank::world."""
    sources, _ = parse_shard_spec(shards)
    urls = [u for s in sources for u in s.urls]
    dataset = _EvalStream(urls, expected_sizes(sources), rank, world_size, batch_size, eval_transform(image_size), max_words)
    return wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=workers)


def eval_num_samples(shards: str) -> int | None:
    """Images in an evaluation shard set, from its manifest (None when unknown)."""
    sources, _ = parse_shard_spec(shards)
    return total_samples(sources)
