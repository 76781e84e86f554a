"""``data`` (`python -m pipeline.bench data`): does loading keep up with training, and is it faster than open_clip's?

On the same webdataset shards of photo-like JPEGs (smooth colour fields with texture, so they
compress and decode like photographs, not like flat drawings) it measures, per image size and
worker count:

- **like for like**: our ``TrainLoader`` and open_clip's ``get_wds_dataset`` doing the same work
  (decode, RandomResizedCrop to 224 at scale 0.9-1 (bicubic), normalise; open_clip also
  tokenises, as it does in training), alternating the two loaders round by round; the row's
  ratio is the median of the per-round ratios, so load on a shared machine affects both sides;
- **config**: our loader at the settings of the given config (its image size, crop scale, flip,
  RandAugment);

and next to them the samples/s of the config's training step (forward + backward + AdamW) on
this machine. open_clip (``pip install 'elip-pipeline[bench]'``) is needed for the comparison.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from pipeline.bench.harness import STEP_CAPTION, format_table
from pipeline.device import pick_device
from pipeline.train.profile import median_wall

LIKE_FOR_LIKE = dict(image_size=224, crop_scale=[0.9, 1.0], hflip=False, randaugment=False)
SHUFFLE = 1000  # open_clip's initial sample buffer (_SAMPLE_SHUFFLE_INITIAL); ours gets the same
POOL = 32  # distinct images per size (drawing one costs more than loading it)
HELP = "loader samples/s vs open_clip's and next to the training step's"


def parse_size(text: str) -> tuple[int, int]:
    """``"256"`` -> (256, 256); ``"640x480"`` -> (640, 480) (width x height)."""
    try:
        w, _, h = text.partition("x")
        size = (int(w), int(h or w))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes: {text!r} is not N or WxH") from None
    if min(size) < 32:
        raise argparse.ArgumentTypeError(f"--sizes: {text!r} is smaller than 32 px")
    return size


def photo_jpeg(index: int, width: int, height: int, quality: int = 90) -> bytes:
    """A ``width x height`` JPEG that costs about what a photograph costs to decode: coarse
    colour regions, mid-scale structure and fine grain (flat drawings decode several times faster)."""
    rng = np.random.default_rng(index)
    img = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((4, 90.0), (24, 40.0), (96, 18.0)):
        field = rng.normal(0, amplitude, (max(2, cells * height // width), cells, 3)).astype(np.float32)
        img += np.stack([np.asarray(Image.fromarray(field[..., c]).resize((width, height), Image.Resampling.BICUBIC))
                         for c in range(3)], -1)
    img += rng.normal(0, 6, img.shape).astype(np.float32) + 128
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_photo_shards(out: Path, num: int, width: int, height: int, shards: int = 4) -> str:
    """``shards`` tars of ``num`` photo-like samples (``POOL`` distinct images) (KEY.jpg, KEY.txt, KEY.json) plus data_prep's
    ``manifest.json``; returns the brace pattern of the tars."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    pool = [photo_jpeg(i, width, height) for i in range(POOL)]  # decoding cost depends on content, not identity
    per = -(-num // shards)
    entries = []
    for s in range(shards):
        name = f"photo-{s:06d}.tar"
        keys = range(s * per, min(num, (s + 1) * per))
        with wds.TarWriter(str(out / name), mtime=int(time.time())) as sink:  # as data_prep writes
            for i in keys:
                sink.write({"__key__": f"{i:08d}", "jpg": pool[i % POOL], "txt": STEP_CAPTION,
                            "json": json.dumps({"captions": [STEP_CAPTION], "source": "bench"}).encode()})
        entries.append({"name": name, "num_samples": len(keys)})
    (out / "manifest.json").write_text(json.dumps({"num_samples": num, "shards": entries}))
    return str(out / f"photo-{{000000..{shards - 1:06d}}}.tar")


def _import_open_clip():
    try:
        import open_clip
        from open_clip_train.data import get_wds_dataset
    except ImportError as exc:
        raise SystemExit(f"bench data: open_clip is needed for the side-by-side comparison ({exc}); "
                         "install it with pip install 'elip-pipeline[bench]' (or open_clip_torch)") from None
    import open_clip_train.data as oc_data
    from webdataset.tariterators import tar_file_expander

    # webdataset 0.2.1xx ends each shard with an empty end-of-shard marker that open_clip's
    # group_by_keys_nothrow reads as a file (KeyError 'fname'); the older 0.2 releases open_clip
    # was written against sent none. Same files, same work: only the marker is dropped.
    oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    return open_clip, get_wds_dataset


def open_clip_batches(pattern: str, num: int, workers: int, batch: int):
    """open_clip's training loader on ``pattern`` at the like-for-like setting: a fresh epoch."""
    open_clip, get_wds_dataset = _import_open_clip()
    args = SimpleNamespace(train_data=pattern, val_data=None, dataset_resampled=False, train_num_samples=num,
                           train_data_upsampling_factors=None, seed=0, batch_size=batch, workers=workers,
                           world_size=1)
    preprocess = open_clip.image_transform(LIKE_FOR_LIKE["image_size"], is_train=True,
                                           aug_cfg=dict(scale=tuple(LIKE_FOR_LIKE["crop_scale"])))
    info = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    return ((images, None) for images, _ in info.dataloader)


def our_batches(data_cfg, pattern: str, num: int, workers: int):
    from pipeline.data.loader import TrainLoader

    loader = TrainLoader(replace(data_cfg, train_shards=pattern, train_num_samples=num, workers=workers))
    return ((b["image"], b["text"]) for b in loader.iter_epoch(0))


def samples_per_s(batches, warmup: int) -> float:
    """Samples/s after the first ``warmup`` batches (worker start-up and the shuffle buffer's
    initial fill are not throughput)."""
    seen, start = 0, None
    for i, (images, _) in enumerate(batches):
        if i + 1 == warmup:
            start = time.perf_counter()
        elif i >= warmup:
            seen += len(images)
    if start is None or seen == 0:
        raise SystemExit(f"bench data: fewer than {warmup + 1} batches; raise --num")
    return seen / (time.perf_counter() - start)


def training_step_row(cfg, name: str, repeats: int) -> dict:
    """Samples/s of the config's training step (forward + backward + AdamW) on this machine's
    accelerator (bf16 autocast on a GPU, fp32 on CPU)."""
    from pipeline.models import build_model

    device = pick_device().type
    batch, size = cfg.data.batch_size, cfg.data.image_size
    model = build_model(cfg.model).train().to(device)
    data = {"image": torch.randn(batch, 3, size, size, device=device), "text": [STEP_CAPTION] * batch,
            "epoch_progress": 1.0}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(data)["loss"]
        loss.backward()
        optimizer.step()

    wall = median_wall(step, repeats=repeats)
    return {"setting": "training step", "method": f"{name}, batch {batch}, 1 {device}", "samples_per_s": batch / wall}


def run(args) -> list[dict]:
    from pipeline.config import DataConfig, load_config

    _import_open_clip()  # fail before building any shards
    cfg = load_config(args.config, args.overrides)
    batch = args.batch
    like = DataConfig(batch_size=batch, shuffle_buffer=SHUFFLE, **LIKE_FOR_LIKE)
    mine = replace(cfg.data, batch_size=batch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width, height in args.sizes:
            pattern = write_photo_shards(Path(tmp) / f"{width}x{height}", args.num, width, height, shards=4)
            jpeg_kib = sum(p.stat().st_size for p in (Path(tmp) / f"{width}x{height}").glob("*.tar")) / args.num / 1024
            for workers in args.workers:
                ours, theirs = [], []
                for _ in range(args.rounds):  # alternate: both loaders see the same machine load
                    ours.append(samples_per_s(our_batches(like, pattern, args.num, workers), warmup=workers))
                    theirs.append(samples_per_s(open_clip_batches(pattern, args.num, workers, batch), warmup=workers))
                base = dict(image=f"{width}x{height}", jpeg_kib=round(jpeg_kib, 1), workers=workers)
                ratio = statistics.median(a / b for a, b in zip(ours, theirs))
                print(f"[bench] {width}x{height}, {workers} worker(s): ours/open_clip {ratio:.2f}x", file=sys.stderr)
                rows.append({**base, "setting": "like for like", "method": "ours",
                             "samples_per_s": statistics.median(ours), "ratio": ratio})
                rows.append({**base, "setting": "like for like", "method": "open_clip",
                             "samples_per_s": statistics.median(theirs), "ratio": 1.0})
                config_rate = statistics.median(samples_per_s(our_batches(mine, pattern, args.num, workers),
                                                              warmup=workers) for _ in range(args.rounds))
                rows.append({**base, "setting": f"{args.config} transforms ({cfg.data.image_size} px)",
                             "method": "ours", "samples_per_s": config_rate})
    rows.append(training_step_row(cfg, args.config, args.repeats))
    print(f"[bench] data: {args.num} photo-like JPEGs per size in 4 shards, batch {batch}, {args.rounds} "
          "alternating rounds; like for like = decode, RandomResizedCrop 224 at scale 0.9-1, normalise "
          "(open_clip also tokenises); ratio = median of the rounds' ours/open_clip")
    print(format_table(rows, [("image", "image", "{}"), ("jpeg_kib", "KiB/jpeg", "{:.0f}"),
                              ("workers", "workers", "{}"), ("setting", "setting", "{}"), ("method", "loader", "{}"),
                              ("samples_per_s", "samples/s", "{:.1f}"), ("ratio", "vs open_clip", "{:.2f}x")]))
    step = rows[-1]["samples_per_s"]
    config_rows = [r for r in rows if r.get("setting", "").endswith("px)")]
    per_worker = min(r["samples_per_s"] / r["workers"] for r in config_rows)
    print(f"the training step takes {step:.0f} samples/s here; at the config's transforms one worker delivers "
          f"at least {per_worker:.0f} samples/s, so give each rank data.workers >= {max(1, -(-step // per_worker)):.0f} "
          "(ranks on one node share its cores)")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny_albef_elip", help="config whose transforms and step are measured")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config (e.g. model.text.pretrained=DIR)")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(256, 256), (640, 480)],
                        help="source image sizes, N or WxH (default: 256 640x480)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num", type=int, default=1536, help="samples per size (the first batch is warm-up)")
    parser.add_argument("--batch", type=int, default=32, help="loader batch size")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per setting")
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps")
