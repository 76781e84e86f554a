"""webdataset loading: shard specs, node/worker split, equal batches per rank, mixing,
corrupt samples skipped and counted, exact resume position, evaluation batches."""
import json
import logging
import tarfile
from collections import Counter

import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data import LoaderPosition, TrainLoader, build_eval_loader, parse_shard_spec, worker_batches
from pipeline.data.loader import shard_assignment
from pipeline.data.shards import ShardSpecError, shard_weights
from pipeline.data.transforms import ALBEF_OPS
from tests.helpers_train import write_shards


def data_cfg(shards, **kw):
    base = dict(train_shards=str(shards), image_size=32, batch_size=4, workers=0, shuffle_buffer=8,
                randaugment=True)
    base.update(kw)
    return DataConfig(**base)


def epoch_keys(loader, epoch=0):
    return [k for b in loader.iter_epoch(epoch) for k in b["key"]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_shards(root / "a", shards=4, per_shard=8, prefix="a", key_prefix="a")
    write_shards(root / "b", shards=2, per_shard=6, prefix="b", key_prefix="b")
    return root


def test_brace_expansion_directories_and_manifest_sizes(shards):
    (src,), _ = parse_shard_spec(f"{shards}/a/a-{{000000..000003}}.tar")
    assert [u.rsplit("/", 1)[1] for u in src.urls] == [f"a-{i:06d}.tar" for i in range(4)]
    assert src.sizes == (8, 8, 8, 8) and src.num_samples == 32
    (by_dir,), _ = parse_shard_spec(str(shards / "a"))
    assert by_dir.urls == src.urls and by_dir.num_samples == 32
    sources, weights = parse_shard_spec(f"{shards}/a::{shards}/b/b-{{000000..000001}}.tar", [3, 1])
    assert [s.num_samples for s in sources] == [32, 12] and weights == [3, 1]
    urls, w = shard_weights(sources, weights)
    # expected samples per draw of each source: weight per shard x shard size, summed = the weight
    assert len(urls) == 6
    assert sum(x * 8 for x in w[:4]) == pytest.approx(3) and sum(x * 6 for x in w[4:]) == pytest.approx(1)
    with pytest.raises(ShardSpecError, match="2 sources but 1 weights"):
        parse_shard_spec(f"{shards}/a::{shards}/b", [1])


def test_concatenated_sources_set_the_epoch_length(shards):
    loader = TrainLoader(data_cfg(f"{shards}/a::{shards}/b"), rank=0, world_size=1)
    assert loader.num_samples == 44 and loader.batches_per_epoch == 11
    keys = epoch_keys(loader)
    assert len(keys) == 44
    assert sorted(Counter(keys).values()) == [1] * 44  # every sample once: passes drain the buffer


def test_weights_need_resampled_and_unknown_sizes_need_num_samples(shards, tmp_path):
    with pytest.raises(ValueError, match="data.train_weights"):
        TrainLoader(data_cfg(f"{shards}/a::{shards}/b", train_weights=[1.0, 1.0]))
    write_shards(tmp_path, shards=1, per_shard=4, manifest=False)
    with pytest.raises(ValueError, match="data.train_num_samples"):
        TrainLoader(data_cfg(f"{tmp_path}/toy-000000.tar"))
    assert TrainLoader(data_cfg(f"{tmp_path}/toy-000000.tar", train_num_samples=4)).batches_per_epoch == 1


def test_resampled_mixing_follows_the_weights(shards):
    spec = f"{shards}/a::{shards}/b"
    only_a = TrainLoader(data_cfg(spec, resampled=True, train_weights=[1.0, 0.0], train_num_samples=64))
    assert {k[0] for k in epoch_keys(only_a)} == {"a"}
    mixed = TrainLoader(data_cfg(spec, resampled=True, train_weights=[1.0, 3.0], train_num_samples=1600, randaugment=False,
                                 shuffle_buffer=0))
    seen = Counter(k[0] for k in epoch_keys(mixed))
    assert 0.15 < seen["a"] / sum(seen.values()) < 0.35  # about 1 : 3 of the samples, by source weight
    assert len(set(epoch_keys(mixed, epoch=1))) > 30  # many different samples of both sources


def test_split_by_node_and_worker_gives_disjoint_shards(shards):
    (src,), _ = parse_shard_spec(str(shards / "a"))
    urls = list(src.urls)
    for epoch in (0, 1):
        parts = [shard_assignment(urls, seed=0, epoch=epoch, rank=r, world_size=2, worker=w, num_workers=2)
                 for r in range(2) for w in range(2)]
        assert all(len(p) == 1 for p in parts)
        assert sorted(u for p in parts for u in p) == sorted(urls)  # disjoint and covering
    orders = {tuple(shard_assignment(urls, 0, e, 0, 1, 0, 1)) for e in range(6)}
    assert len(orders) > 1  # the shard order changes with the epoch ...
    assert shard_assignment(urls, 0, 3, 0, 1, 0, 1) == shard_assignment(urls, 0, 3, 0, 1, 0, 1)  # ... deterministically


def test_ranks_read_disjoint_samples_and_get_equal_batch_counts(tmp_path):
    # 5 shards of unequal size over 2 ranks: a rank whose shards run short repeats data
    for i, n in enumerate([9, 3, 7, 5, 6]):
        write_shards(tmp_path / f"s{i}", shards=1, per_shard=n, prefix=f"s{i}")
    spec = "::".join(str(tmp_path / f"s{i}") for i in range(5))
    loaders = [TrainLoader(data_cfg(spec, batch_size=3), rank=r, world_size=2) for r in range(2)]
    assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch == 30 // 6
    batches = [[b for b in lo.iter_epoch(0)] for lo in loaders]
    assert [len(b) for b in batches] == [5, 5]
    assert all(b["image"].shape == (3, 3, 32, 32) for bs in batches for b in bs)


def test_two_workers_equal_counts_and_exact_resume(shards):
    cfg = data_cfg(shards / "a", workers=2, randaugment=True)
    full = [b for b in TrainLoader(cfg, rank=1, world_size=2).iter_epoch(0)]
    assert len(full) == 4
    for stop in (1, 3):  # resume on either worker of the round-robin
        loader = TrainLoader(cfg, rank=1, world_size=2)
        it = loader.iter_epoch(0)
        head = [next(it) for _ in range(stop)]
        it.close()
        state = json.loads(json.dumps(loader.position.state_dict()))  # survives a JSON round trip
        resumed = TrainLoader(cfg, rank=1, world_size=2)
        resumed.position.load_state_dict(state)
        tail = list(resumed.iter_epoch(0))
        got = head + tail
        assert [b["key"] for b in got] == [b["key"] for b in full]
        for a, b in zip(got, full):  # same augmentations too: they are seeded per sample
            assert torch.equal(a["image"], b["image"]) and a["text"] == b["text"]
        assert resumed.position.batches == 4
    # the next epoch starts from its beginning
    assert len(list(resumed.iter_epoch(1))) == 4 and resumed.position.epoch == 1


def test_corrupt_sample_and_truncated_tar_are_skipped_and_counted(tmp_path, caplog):
    write_shards(tmp_path, shards=2, per_shard=8, corrupt_keys=("000003",))
    tar = tmp_path / "toy-000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) * 2 // 3 + 700])  # a tar cut short inside a member
    with pytest.raises(tarfile.ReadError):
        with tarfile.open(tar, "r|") as tf:
            for member in tf:
                tf.extractfile(member).read()
    loader = TrainLoader(data_cfg(tmp_path, train_num_samples=16, shuffle_buffer=0), rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        batches = list(loader.iter_epoch(0))
    assert len(batches) == 4 and all(len(b["text"]) == 4 for b in batches)  # training goes on
    keys = [k for b in batches for k in b["key"]]
    assert "000003" not in keys
    # the broken JPEG, and the truncated tar's lost samples against its manifest (8 listed)
    read = len({k for k in keys if k.startswith("001")})
    assert loader.position.errors == 1 + (8 - read) and read < 8
    logged = [r.getMessage() for r in caplog.records if "skipped a broken sample" in r.getMessage()]
    assert len(logged) == 1  # rate-limited: the first one, then at most one line per 30 s
    named = [r.getMessage() for r in caplog.records if "toy-000001.tar has" in r.getMessage()]
    assert len(named) == 1 and f"{8 - read} sample(s) missing" in named[0]  # once, though read twice


def test_captions_are_cleaned_and_cut(tmp_path):
    import webdataset as wds
    from tests.helpers_train import _jpeg

    with wds.TarWriter(str(tmp_path / "c-000000.tar")) as sink:
        for i in range(4):
            sink.write({"__key__": f"k{i}", "jpg": _jpeg((200, 0, 0), 32, i),
                        "txt": "A RED, Square -- on the left! " + "word " * 50})
    loader = TrainLoader(data_cfg(tmp_path / "c-000000.tar", train_num_samples=4, max_words=6))
    (batch,) = list(loader.iter_epoch(0))
    assert batch["text"][0] == "a red square on the left"  # 6 words, punctuation dropped


def test_position_bookkeeping():
    assert [worker_batches(7, 3, w) for w in range(3)] == [3, 2, 2]
    pos = LoaderPosition()
    pos.start_epoch(2, num_workers=2)
    pos.update({"worker": 0, "raw_end": 4, "errors": 1})
    pos.update({"worker": 1, "raw_end": 5, "errors": 0})
    assert (pos.epoch, pos.batches, pos.errors) == (2, 2, 1)
    pos.start_epoch(3, num_workers=2)
    assert pos.errors == 1 and pos.batches == 0  # errors accumulate over epochs


def test_eval_loader_yields_every_image_once_with_all_captions(tmp_path):
    write_shards(tmp_path, shards=3, per_shard=5, captions_per_image=3)
    batches = list(build_eval_loader(str(tmp_path), image_size=32, batch_size=4))
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(f"{s:03d}{i:03d}" for s in range(3) for i in range(5))
    assert [len(b["key"]) for b in batches][-1] <= 4 and batches[0]["image"].shape[1:] == (3, 32, 32)
    assert all(len(c) == 3 for b in batches for c in b["captions"])
    split = [list(build_eval_loader(str(tmp_path), image_size=32, batch_size=4, rank=r, world_size=2))
             for r in range(2)]
    rank_keys = [{k for b in bs for k in b["key"]} for bs in split]
    assert not rank_keys[0] & rank_keys[1] and rank_keys[0] | rank_keys[1] == set(keys)


def _photo(width, height):
    from pipeline.bench.data import photo_jpeg

    return photo_jpeg(7, width, height)


def test_augmentation_is_a_pure_function_of_its_generator():
    from pipeline.data import TrainTransform

    from torchvision import transforms as T

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    transform = TrainTransform(64, crop_scale=(0.2, 1.0), randaugment=True, hflip=True)
    data = [_photo(160, 120)]
    a, b = transform(data, gen(5)), transform(data, gen(5))
    assert a.dtype == torch.uint8 and a.shape == (1, 3, 64, 64) and torch.equal(a, b)
    outs = [transform(data, gen(s)) for s in range(8)]
    assert len({o.numpy().tobytes() for o in outs}) == 8  # other seeds, other crops / ops
    params = [transform.sample(160, 120, gen(s)) for s in range(200)]
    for seed, p in enumerate(params[:20]):  # the draws torchvision's transforms make, seeded alike
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            crop = T.RandomResizedCrop.get_params(torch.zeros(3, 120, 160), [0.2, 1.0], [3 / 4, 4 / 3])
            flip = bool(torch.rand(1) < 0.5)
        assert p.crop == crop and p.flip == flip
    assert {p.flip for p in params} == {True, False}
    assert {name for p in params for name, _ in p.ops} == set(ALBEF_OPS)  # every ALBEF op, only those
    assert all(len(p.ops) == 2 for p in params)


def test_loader_never_touches_the_global_rngs(shards, monkeypatch):
    import random

    import numpy as np

    def forbidden(*args, **kwargs):
        raise AssertionError("the loader reseeded torch's global generator")

    monkeypatch.setattr(torch, "manual_seed", forbidden)
    monkeypatch.setattr(torch.random, "manual_seed", forbidden)
    monkeypatch.setattr(torch.random, "fork_rng", forbidden)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    cfg = data_cfg(shards / "a", randaugment=True, crop_scale=[0.2, 1.0])
    first = [b["image"] for b in TrainLoader(cfg).iter_epoch(0)]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    torch.rand(5)  # another consumer of the global RNG changes nothing in the data
    random.random()
    again = [b["image"] for b in TrainLoader(cfg).iter_epoch(0)]
    assert all(torch.equal(x, y) for x, y in zip(first, again)) and len(first) == 8


def test_large_jpegs_are_decoded_at_reduced_size_without_losing_resolution(monkeypatch):
    import io

    import numpy as np
    from PIL import Image
    from PIL.JpegImagePlugin import JpegImageFile
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from pipeline.data import TrainTransform

    drafts = []
    real_draft = JpegImageFile.draft
    monkeypatch.setattr(JpegImageFile, "draft", lambda self, mode, size: drafts.append(size) or real_draft(self, mode, size))
    transform = TrainTransform(112, crop_scale=(0.9, 1.0), randaugment=False, hflip=False)
    y, x = np.mgrid[0:768, 0:1024]
    waves = [128 + 100 * np.sin(2 * np.pi * x / 60 + c) * np.cos(2 * np.pi * y / 50 + c) for c in range(3)]
    buf = io.BytesIO()  # detail of about 7 output pixels per period: lost if decoded too small
    Image.fromarray(np.stack(waves, -1).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    for seed in range(4):
        params = transform.sample(1024, 768, torch.Generator().manual_seed(seed))
        out = transform.apply(Image.open(io.BytesIO(data)), params).permute(1, 2, 0).numpy().astype(float)
        full = Image.open(io.BytesIO(data)).convert("RGB")  # full-size decode, torchvision's crop + resize
        snapped = [v // 4 * 4 for v in params.crop]  # decoded at 1/4: the crop on that pixel grid
        ref = np.array(TF.resized_crop(full, *snapped, [112, 112], InterpolationMode.BICUBIC)).astype(float)
        assert np.abs(out - ref).mean() < 1.5  # the same picture (decoded at 1/8: 2.8) ...
        assert abs(out.std() / ref.std() - 1) < 0.02  # ... with its contrast (at 1/8: 0.93): the same resolution
    # crops of >= 690 of 768 rows, 112 px out: decoded at 1/4 (>= 172 rows), not 1/8 (86 < 112)
    assert drafts == [(256, 192)] * 4
    drafts.clear()
    small = TrainTransform(224, crop_scale=(0.9, 1.0), randaugment=False, hflip=False)
    out = small([_photo(256, 256)], torch.Generator().manual_seed(0))
    assert drafts == [] and out.shape == (1, 3, 224, 224)  # a 256 px image is decoded in full


def _cut_points(tar):
    """Offsets of every member's header start and a point inside each header."""
    with tarfile.open(tar) as tf:
        starts = [m.offset for m in tf.getmembers()]
    return starts, [o + 100 for o in starts]


def _epoch_account(directory, num, caplog, **kw):
    loader = TrainLoader(data_cfg(directory, train_num_samples=num, shuffle_buffer=0, randaugment=False, **kw))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        keys = {k for b in loader.iter_epoch(0) for k in b["key"]}
    return keys, loader.position.errors, [r.getMessage() for r in caplog.records]


def test_a_tar_cut_at_or_inside_a_header_is_counted_and_named(tmp_path, caplog):
    import random

    write_shards(tmp_path, shards=1, per_shard=50, size=16)
    tar = tmp_path / "toy-000000.tar"
    data = tar.read_bytes()
    starts, inside = _cut_points(tar)
    rng = random.Random(0)
    cuts = rng.sample(starts[3:], 4) + rng.sample(inside[3:], 4) + rng.sample(range(2000, len(data) - 1024), 4)
    for cut in cuts:
        tar.write_bytes(data[:cut])
        with tarfile.open(tar) as tf:  # what a cut loses: tarfile itself reads a header cut as the end
            try:
                complete = len({m.name.split(".")[0] for m in tf}) - 1
            except tarfile.ReadError:
                complete = 0
        keys, errors, messages = _epoch_account(tmp_path, 52, caplog)  # reads past the end of the shard
        lost = 50 - len(keys)
        assert lost >= 1 and errors >= lost, (cut, lost, errors)  # nothing is lost without a count
        assert any("toy-000000.tar has" in m and "missing" in m for m in messages), (cut, messages)
        assert len(keys) >= complete

    # without a manifest: a cut at a header boundary is found by the missing end-of-archive marker
    (tmp_path / "manifest.json").unlink()
    tar.write_bytes(data[: starts[20]])
    keys, errors, messages = _epoch_account(tar, 16, caplog)
    assert errors >= 1 and any("toy-000000.tar ends without tar's end-of-archive marker" in m for m in messages)
    tar.write_bytes(data)
    keys, errors, messages = _epoch_account(tar, 16, caplog)
    assert errors == 0 and not messages  # an intact shard: no false alarm


def test_a_shard_listed_in_the_manifest_but_missing_is_named(tmp_path, caplog):
    write_shards(tmp_path, shards=3, per_shard=8)
    (tmp_path / "toy-000001.tar").unlink()
    keys, errors, messages = _epoch_account(tmp_path, 24, caplog)
    assert not any(k.startswith("001") for k in keys) and errors == 8
    named = [m for m in messages if "toy-000001.tar cannot be opened" in m]
    assert len(named) == 1 and "8 sample(s) missing" in named[0]
