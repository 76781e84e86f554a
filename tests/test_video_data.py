"""data_prep's video source (PyAV) and T-frame samples in the loaders: tiny videos are written
with PyAV here, sharded, read back frame by frame, and batched as [B, T, 3, H, W]."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import webdataset as wds

from data_prep.__main__ import main as data_prep_main
from data_prep.video import frame_indices
from pipeline.config import DataConfig
from pipeline.data.loader import TrainLoader, build_eval_loader

FRAMES = 12


def write_video(path, level: int, num_frames: int = FRAMES, size: int = 32) -> None:
    """Frame i is a flat colour whose red value is ``level + 16 * i``: frames can be told apart."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for i in range(num_frames):
            arr = np.zeros((size, size, 3), np.uint8)
            arr[..., 0] = level + 16 * i
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for v in range(3):
        write_video(root / f"video{v}.mp4", level=10 * v)
    (root / "broken.mp4").write_bytes(b"not a video at all")
    info = {"videos": [{"video_id": f"video{v}", "split": "train"} for v in range(3)]
            + [{"video_id": "video9", "split": "train"}, {"video_id": "broken", "split": "train"},
               {"video_id": "video0", "split": "test"}],
            "sentences": [{"video_id": f"video{v}", "caption": f"A clip, number {v}!"} for v in range(3)]
            + [{"video_id": "video0", "caption": "the second caption of clip zero"},
               {"video_id": "video9", "caption": "missing"}, {"video_id": "broken", "caption": "broken"}]}
    (root / "msrvtt.json").write_text(json.dumps(info))
    out = root / "shards"
    rc = data_prep_main(["video", "--annotations", str(root / "msrvtt.json"), "--videos", str(root), "--frames", "4",
                         "--split", "train", "--image-size", "24", "--out", str(out), "--shard-size", "2",
                         "--min-shards", "1", "--workers", "1", "--no-progress"])
    assert rc == 0
    return root, out


def test_frame_indices_take_the_middle_of_equal_segments():
    assert frame_indices(12, 4) == [1, 4, 7, 10]
    assert frame_indices(3, 4) == [0, 1, 1, 2]  # short videos repeat frames
    assert frame_indices(1, 2) == [0, 0]


def test_video_shards_round_trip(videos):
    root, out = videos
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 3
    source = manifest["sources"]["video"]
    assert source["failures"] == {"missing file": 1, "not a video": 1}
    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False))
    assert len(samples) == 3
    for v, sample in enumerate(samples):
        assert {"0.jpg", "1.jpg", "2.jpg", "3.jpg", "txt", "json"} <= set(sample)
        meta = json.loads(sample["json"])
        assert meta["video_id"] == f"video{v}" and meta["num_frames"] == 4 and meta["video_frames"] == FRAMES
        assert meta["captions"][0] == f"a clip number {v}" and sample["txt"].decode() == f"a clip number {v}"
        from PIL import Image
        import io

        reds = [np.asarray(Image.open(io.BytesIO(sample[f"{i}.jpg"])))[..., 0].mean() for i in range(4)]
        expected = [10 * v + 16 * i for i in frame_indices(FRAMES, 4)]
        assert np.allclose(reds, expected, atol=6), (reds, expected)  # the uniformly sampled frames, in order
        assert Image.open(io.BytesIO(sample["0.jpg"])).size == (24, 24)
    assert json.loads(samples[0]["json"])["captions"] == ["a clip number 0", "the second caption of clip zero"]


def test_loaders_batch_video_samples_as_frames(videos):
    _, out = videos
    cfg = replace(DataConfig(), train_shards=str(out), image_size=16, batch_size=2, workers=0, shuffle_buffer=0,
                  randaugment=False)
    batch = next(iter(TrainLoader(cfg).iter_epoch(0)))
    assert batch["image"].shape == (2, 4, 3, 16, 16)
    # one crop per clip: the frames differ only in colour, never in where the crop fell
    assert torch.allclose(batch["image"][0, 0, 1:], batch["image"][0, 1, 1:], atol=0.2)
    assert not torch.allclose(batch["image"][0, 0, 0], batch["image"][0, 3, 0], atol=0.05)
    batches = list(build_eval_loader(str(out), image_size=16, batch_size=2))
    assert [b["image"].shape for b in batches] == [(2, 4, 3, 16, 16), (1, 4, 3, 16, 16)]
    assert batches[0]["captions"][0] == ["a clip number 0", "the second caption of clip zero"]


def tar_members(path) -> list:
    import tarfile

    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_video_part_writes_only_its_own_shards(videos, tmp_path):
    root, whole = videos
    out = tmp_path / "parts"
    common = ["video", "--annotations", str(root / "msrvtt.json"), "--videos", str(root), "--frames", "4",
              "--split", "train", "--image-size", "24", "--out", str(out), "--shard-size", "2",
              "--min-shards", "1", "--workers", "1", "--no-progress"]
    assert data_prep_main(common + ["--part", "1/2"]) == 0
    # 5 rows (two of them skipped while writing) in 3 shards: task 1 of 2 writes shard 1 only
    assert sorted(p.name for p in out.glob("*.tar")) == ["video-000001.tar"]
    assert not (out / "manifest.json").exists()
    assert data_prep_main(common + ["--part", "0/2"]) == 0
    names = [f"video-{i:06d}.tar" for i in range(3)]
    assert sorted(p.name for p in out.glob("*.tar")) == names
    for name in names:  # the same members as one task writing everything (tar headers hold mtimes)
        assert tar_members(out / name) == tar_members(whole / name)
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 3
