"""data_prep: local sources (COCO, VG, Flickr30k), synthetic, resume after kill, errors,
report, resumable downloads. URL sources (img2dataset) are in test_data_prep_urls.py."""
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from data_prep import synthetic
from data_prep.__main__ import main
from data_prep.captions import clean_captions, pre_caption
from data_prep.download import fetch
from data_prep.errors import DataPrepError
from data_prep_fixtures import HTML, http_server, jpeg, read_shards, truncated_jpeg

REPO = Path(__file__).resolve().parents[1]
FAST = ["--no-progress", "--workers", "1", "--min-shards", "1"]


def run(*argv) -> int:
    return main([str(a) for a in argv])


def cli(*argv, env_extra=None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "data_prep", *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, **kw)


def manifest(out) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ---------------------------------------------------------------------------------- captions


def test_pre_caption_follows_albef_blip_cleaning():
    assert pre_caption("A man, riding a HORSE!!  on the   beach.") == "a man riding a horse on the beach"
    assert pre_caption("It's a dog-friendly <PERSON> place/park") == "its a dog friendly person place park"
    assert pre_caption(" one two three four ", max_words=2) == "one two"
    assert pre_caption("a b c", max_words=0) == "a b c"
    assert pre_caption("?!...") == "" and pre_caption(None) == ""
    assert clean_captions(["A cat.", "a cat", "", None, "Two DOGS"]) == ["a cat", "two dogs"]


# --------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_learnable_and_fast(tmp_path):
    t0 = time.time()
    m = synthetic.build(tmp_path / "a", num=1200, seed=3, image_size=96, shard_size=250, min_shards=1)
    elapsed = time.time() - t0
    assert elapsed < 15, elapsed  # thousands of 96 px images take seconds
    assert m["num_samples"] == 1200 and m["num_shards"] == 5
    assert [s["num_samples"] for s in m["shards"]] == [250, 250, 250, 250, 200]
    a = read_shards(tmp_path / "a")
    assert len(a) == 1200
    synthetic.build(tmp_path / "b", num=1200, seed=3, image_size=96, shard_size=500, min_shards=1)
    b = read_shards(tmp_path / "b")
    assert {k: (v["txt"], v["jpg"]) for k, v in a.items()} == {k: (v["txt"], v["jpg"]) for k, v in b.items()}

    sample = a["synthetic-000000007"]
    meta = sample["json"]
    assert meta["source"] == "synthetic" and meta["original_size"] == [96, 96] and meta["image_id"] == 7
    # the caption names what is drawn: every group's colour, shape and position
    for g in meta["objects"]:
        assert g["colour"] in sample["txt"] and g["shape"] in sample["txt"] and g["position"] in sample["txt"]
    # the vocabulary is small, and images are distinguishable (retrieval above chance possible)
    vocab = {w for v in a.values() for w in v["txt"].split()}
    assert len(vocab) < 40, sorted(vocab)
    compositions = {json.dumps(v["json"]["objects"], sort_keys=True) for v in a.values()}
    assert len(compositions) > 900
    # the drawn colour is really there: a red group makes the image contain red pixels
    from PIL import Image
    red = next(v for v in a.values() if all(g["colour"] == "red" for g in v["json"]["objects"]))
    pixels = Image.open(io.BytesIO(red["jpg"])).convert("RGB").getdata()
    assert any(r > 180 and g < 90 and b_ < 90 for r, g, b_ in pixels)

    # another seed draws another dataset; the Python API returns the same example as the shards
    other = synthetic.build(tmp_path / "c", num=50, seed=4, shard_size=50, min_shards=1)
    assert other["num_samples"] == 50
    assert {v["jpg"] for v in read_shards(tmp_path / "c").values()}.isdisjoint(v["jpg"] for v in a.values())
    image, captions, groups = synthetic.make_example(3, 7)
    assert groups == meta["objects"] and captions == [sample["txt"]] and image.size == (96, 96)


def test_synthetic_eval_set_cli_keeps_five_captions(tmp_path, capsys):
    out = tmp_path / "syn"
    assert run("synthetic", "--num", 40, "--out", out, "--shard-size", 16, "--no-progress", "--workers", 1) == 0
    assert run("synthetic", "--num", 20, "--eval", "--out", out, "--shard-size", 16, *FAST) == 0
    err = capsys.readouterr().err
    assert "warning: synthetic: 3 shard(s)" in err and "64" in err  # fewer shards than 2x8x4 readers
    m = manifest(out)
    assert m["num_samples"] == 60 and m["sources"]["synthetic_test"]["eval"] is True
    test = read_shards(out, "synthetic_test")
    train = read_shards(out, "synthetic")
    assert len(test) == 20 and len(train) == 40
    for v in test.values():
        caps = v["json"]["captions"]
        assert len(caps) == 5 and len(set(caps)) == 5 and v["txt"] == caps[0]
        assert v["json"]["split"] == "test"
    # evaluation images are not training images
    assert not {v["jpg"] for v in test.values()} & {v["jpg"] for v in train.values()}
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {s["name"]: s["num_samples"] for s in m["shards"]}
    assert sum(sizes.values()) == 60 and "synthetic_test-000001.tar" in sizes


# ------------------------------------------------------------------------------------- COCO


@pytest.fixture
def coco_dir(tmp_path):
    """A COCO root with train2014/ and val2014/ images, some of them bad."""
    root = tmp_path / "coco"
    for i in range(1, 9):
        write(root / "train2014" / f"COCO_train2014_{i:012d}.jpg", jpeg(64 + i, 48, (20 * i, 90, 150)))
    write(root / "train2014" / "COCO_train2014_000000000003.jpg", truncated_jpeg())
    write(root / "train2014" / "COCO_train2014_000000000004.jpg", HTML)
    os.remove(root / "train2014" / "COCO_train2014_000000000005.jpg")
    for i in range(20, 26):
        write(root / "val2014" / f"COCO_val2014_{i:012d}.jpg", jpeg(50, 40 + i, (100, 20 * (i - 19), 50)))
    return root


def official_captions():
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": 64 + i, "height": 48}
              for i in range(1, 9)]
    anns = [{"id": 100 + i, "image_id": i, "caption": f"A Photo, of thing #{i}!"} for i in range(1, 9) if i != 6]
    anns += [{"id": 200, "image_id": 1, "caption": "Another   caption: for one."},
             {"id": 201, "image_id": 999, "caption": "refers to no image"},
             {"id": 202, "image_id": 2, "caption": "   "}]
    images.append({"file_name": "no id.jpg"})
    return {"info": {}, "images": images, "annotations": anns}


def test_coco_official_captions(tmp_path, coco_dir):
    ann = write(tmp_path / "annotations" / "captions_train2014.json", official_captions())
    out = tmp_path / "out"
    assert run("coco", "--annotations", ann, "--images", coco_dir, "--out", out, "--shard-size", 3,
               "--image-size", 0, *FAST) == 0
    m = manifest(out)
    src = m["sources"]["coco_train2014"]
    # 8 images: 3 truncated, 4 html, 5 missing, 6 has no caption; 1 bad image entry, 1 bad annotation
    assert src["failures"] == {"truncated": 1, "not an image": 1, "missing file": 1, "empty caption": 1,
                               "bad row": 2}
    assert m["num_samples"] == 4 and src["num_samples"] == 4 and src["complete"]
    samples = read_shards(out)
    by_id = {v["json"]["image_id"]: v for v in samples.values()}
    assert sorted(by_id) == [1, 2, 7, 8]
    assert by_id[1]["txt"] == "a photo of thing 1"
    assert by_id[1]["json"]["captions"] == ["a photo of thing 1", "another caption for one"]
    assert by_id[7]["json"]["original_size"] == [71, 48] and by_id[7]["json"]["source"] == "coco"
    # with --image-size 0 a JPEG is stored byte for byte
    assert by_id[8]["jpg"] == (coco_dir / "train2014" / "COCO_train2014_000000000008.jpg").read_bytes()
    assert m["sources"]["coco_train2014"]["examples"]["missing file"][0].endswith("COCO_train2014_000000000005.jpg")
    assert [s["name"] for s in m["shards"]] == ["coco_train2014-000000.tar", "coco_train2014-000001.tar",
                                                "coco_train2014-000002.tar"]
    assert sum(s["num_samples"] for s in m["shards"]) == 4


def karpathy_coco():
    images = []
    for i, split in zip(range(1, 9), ["train", "train", "restval", "train", "val", "test", "test", "train"]):
        images.append({"filepath": "train2014", "filename": f"COCO_train2014_{i:012d}.jpg", "imgid": i,
                       "cocoid": 1000 + i, "split": split,
                       "sentences": [{"raw": f"Caption {k} of image {i}.", "tokens": []} for k in range(5)]})
    images.append({"filepath": "val2014", "filename": "COCO_val2014_000000000020.jpg", "cocoid": 20,
                   "split": "test", "sentences": [{"raw": f"Val-image caption {k}"} for k in range(5)]})
    return {"dataset": "coco", "images": images}


def test_coco_karpathy_train_and_eval_splits(tmp_path, coco_dir):
    ann = write(tmp_path / "dataset_coco.json", karpathy_coco())
    out = tmp_path / "out"
    assert run("coco", "--annotations", ann, "--images", coco_dir, "--out", out, "--shard-size", 2, *FAST) == 0
    train = manifest(out)["sources"]["coco"]
    # train = train + restval: images 1, 2, 3 (truncated), 4 (html), 8 -> 3 written
    assert train["num_samples"] == 3 and train["eval"] is False
    assert train["failures"] == {"truncated": 1, "not an image": 1}
    assert run("coco", "--annotations", ann, "--images", coco_dir, "--out", out, "--split", "test", *FAST) == 0
    m = manifest(out)
    test = m["sources"]["coco_test"]
    assert test["eval"] is True and test["split"] == "test" and test["num_samples"] == 3
    samples = read_shards(out, "coco_test")
    assert sorted(v["json"]["image_id"] for v in samples.values()) == [20, 1006, 1007]
    for v in samples.values():
        assert len(v["json"]["captions"]) == 5 and v["txt"] == v["json"]["captions"][0]
    assert m["num_samples"] == 6


def test_coco_albef_blip_lists_and_per_caption(tmp_path, coco_dir):
    train = [{"image": f"train2014/COCO_train2014_{i:012d}.jpg", "caption": f"Caption {k} for {i}.",
              "image_id": f"coco_{i}"} for i in (1, 2, 7) for k in range(2)]
    train += [{"image": "train2014/COCO_train2014_000000000008.jpg", "caption": ""},
              {"caption": "no image key"}]
    ann = write(tmp_path / "coco_karpathy_train.json", train)
    out = tmp_path / "out"
    assert run("coco", "--annotations", ann, "--images", coco_dir, "--out", out, *FAST) == 0
    src = manifest(out)["sources"]["coco"]
    assert src["num_samples"] == 3 and src["failures"] == {"empty caption": 1, "bad row": 1}
    merged = {v["json"]["image_id"]: v["json"]["captions"] for v in read_shards(out).values()}
    assert merged["coco_7"] == ["caption 0 for 7", "caption 1 for 7"]

    out2 = tmp_path / "per_caption"
    assert run("coco", "--annotations", ann, "--images", coco_dir, "--out", out2, "--per-caption", *FAST) == 0
    per = read_shards(out2)
    assert len(per) == 6 and sorted(v["txt"] for v in per.values())[:2] == ["caption 0 for 1", "caption 0 for 2"]

    test = [{"image": f"val2014/COCO_val2014_{i:012d}.jpg", "caption": [f"Test {i} caption {k}" for k in range(5)]}
            for i in range(20, 24)]
    ann_test = write(tmp_path / "coco_karpathy_test.json", test)
    assert run("coco", "--annotations", ann_test, "--images", coco_dir, "--out", out, *FAST) == 0
    m = manifest(out)["sources"]["coco_test"]
    assert m["eval"] is True and m["num_samples"] == 4
    assert all(len(v["json"]["captions"]) == 5 for v in read_shards(out, "coco_test").values())


# --------------------------------------------------------------------------------------- VG


def test_visual_genome_official_and_blip_formats(tmp_path):
    images = tmp_path / "vg"
    write(images / "VG_100K" / "1.jpg", jpeg(80, 60))
    write(images / "VG_100K_2" / "2.jpg", jpeg(60, 80))
    write(images / "VG_100K_2" / "3.jpg", truncated_jpeg())
    regions = [
        {"id": 1, "regions": [{"region_id": 11, "image_id": 1, "phrase": "A red BALL.", "x": 0, "y": 0},
                              {"region_id": 12, "image_id": 1, "phrase": "a red ball"},
                              {"region_id": 13, "image_id": 1, "phrase": "green grass"}]},
        {"id": 2, "regions": [{"region_id": 21, "image_id": 2, "phrase": "man, wearing hat"}]},
        {"id": 3, "regions": [{"region_id": 31, "image_id": 3, "phrase": "blurry"}]},
        {"id": 4, "regions": [{"region_id": 41, "image_id": 4, "phrase": "nowhere"}]},
        {"id": 5, "regions": [{"region_id": 51, "image_id": 5, "phrase": ""}]},
        {"regions": "broken"},
    ]
    image_data = [{"image_id": i, "url": f"https://cs.stanford.edu/people/rak248/{d}/{i}.jpg", "width": 80,
                   "height": 60} for i, d in ((1, "VG_100K"), (2, "VG_100K_2"), (3, "VG_100K_2"))]
    ann = write(tmp_path / "region_descriptions.json", regions)
    data = write(tmp_path / "image_data.json", image_data)
    out = tmp_path / "out"
    assert run("vg", "--annotations", ann, "--image-data", data, "--images", images, "--out", out, *FAST) == 0
    src = manifest(out)["sources"]["vg"]
    assert src["failures"] == {"truncated": 1, "missing file": 1, "empty caption": 1, "bad row": 1}
    samples = {v["json"]["image_id"]: v for v in read_shards(out).values()}
    assert samples[1]["json"]["captions"] == ["a red ball", "green grass"]  # duplicates dropped
    assert samples[2]["txt"] == "man wearing hat" and samples[2]["json"]["original_size"] == [60, 80]

    # without image_data.json the image is looked up in VG_100K/ and VG_100K_2/
    out2 = tmp_path / "out2"
    assert run("vg", "--annotations", ann, "--images", images, "--out", out2, *FAST) == 0
    assert manifest(out2)["num_samples"] == 2

    blip = [{"image": "VG_100K/1.jpg", "caption": "A ball"}, {"image": "VG_100K/1.jpg", "caption": "grass!"},
            {"image": "2.jpg", "caption": "A hat"}]
    ann2 = write(tmp_path / "vg_caption.json", blip)
    out3 = tmp_path / "out3"
    assert run("vg", "--annotations", ann2, "--images", images, "--out", out3, *FAST) == 0
    got = {v["json"]["image_id"]: v["json"]["captions"] for v in read_shards(out3).values()}
    assert got == {"1": ["a ball", "grass"], "2": ["a hat"]}


# -------------------------------------------------------------------------------- Flickr30k


def test_flickr30k_karpathy_eval_set(tmp_path):
    images = tmp_path / "flickr30k-images"
    for i in range(4):
        write(images / f"{1000 + i}.jpg", jpeg(90, 70))
    ann = write(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
        {"filename": f"{1000 + i}.jpg", "imgid": i, "split": split,
         "sentences": [{"raw": f"Person {k} in photo {i}."} for k in range(5)]}
        for i, split in enumerate(["train", "test", "test", "val"])]})
    out = tmp_path / "out"
    assert run("flickr30k", "--annotations", ann, "--images", images, "--out", out, *FAST) == 0
    m = manifest(out)
    assert list(m["sources"]) == ["flickr30k_test"] and m["sources"]["flickr30k_test"]["eval"] is True
    samples = read_shards(out)
    assert sorted(v["json"]["image_id"] for v in samples.values()) == [1, 2]
    assert all(len(v["json"]["captions"]) == 5 for v in samples.values())


# --------------------------------------------------------------------- resume after a kill


def _snapshot(out):
    return {k: (v["txt"], json.dumps(v["json"], sort_keys=True), v["jpg"]) for k, v in read_shards(out).items()}


def test_resume_after_kill_gives_the_uninterrupted_result(tmp_path, coco_dir):
    rows = [{"image": f"train2014/COCO_train2014_{1 + i % 8:012d}.jpg", "caption": f"caption number {i}"}
            for i in range(8)]
    rows += [{"image": f"val2014/COCO_val2014_{20 + i % 6:012d}.jpg", "caption": f"val caption {i}"}
             for i in range(6)]
    ann = write(tmp_path / "coco_karpathy_train.json", rows)
    args = ["coco", "--annotations", ann, "--images", coco_dir, "--shard-size", 3, "--image-size", 32,
            "--no-progress", "--workers", "1", "--min-shards", "1"]

    reference = tmp_path / "reference"
    assert run(*args, "--out", reference) == 0

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DATA_PREP_TEST_SLEEP": "0.15"}
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", *map(str, args), "--out", str(out)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    first = out / "coco-000000.tar"
    deadline = time.time() + 60
    while not (out / "_progress" / "coco" / "000001.json").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "coco-000004.tar").exists()  # it really stopped half-way
    assert not (out / "manifest.json").exists() or not manifest(out)["sources"]["coco"]["complete"]
    assert "INCOMPLETE" in cli("report", out).stdout
    kept = (first.stat().st_ino, first.stat().st_mtime_ns)

    res = cli(*args, "--out", out)
    assert res.returncode == 0, res.stderr
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == kept  # completed shards are kept
    assert not list(out.glob(".*.partial"))
    assert _snapshot(out) == _snapshot(reference)  # nothing duplicated, nothing missing
    m, ref = manifest(out), manifest(reference)
    assert m["shards"] == ref["shards"] and m["num_samples"] == ref["num_samples"] == 11
    assert m["sources"]["coco"]["failures"] == ref["sources"]["coco"]["failures"] == {
        "truncated": 1, "not an image": 1, "missing file": 1}

    # and running the finished command again changes nothing
    assert run(*args, "--out", out) == 0
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == kept


def test_parallel_workers_write_the_same_shards(tmp_path):
    synthetic.build(tmp_path / "one", num=90, seed=1, shard_size=20, min_shards=1)
    synthetic.build(tmp_path / "two", num=90, seed=1, shard_size=20, min_shards=1, workers=2)
    assert _snapshot(tmp_path / "one") == _snapshot(tmp_path / "two")
    assert manifest(tmp_path / "one")["shards"] == manifest(tmp_path / "two")["shards"]


def test_rerun_with_other_options_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    assert run("synthetic", "--num", 10, "--out", out, "--shard-size", 5, *FAST) == 0
    assert run("synthetic", "--num", 10, "--out", out, "--shard-size", 4, *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert "shard_size=5 (now 4)" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert run("synthetic", "--num", 10, "--out", out, "--shard-size", 4, "--overwrite", *FAST) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == [f"synthetic-00000{i}.tar" for i in range(3)]
    assert manifest(out)["num_samples"] == 10


# -------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("content, expect", [
    (None, "file not found (expected COCO captions JSON"),
    ("{not json", "not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
    ({"licenses": []}, "expected COCO captions JSON"),
])
def test_bad_annotation_file_is_one_clear_line(tmp_path, capsys, content, expect):
    ann = tmp_path / "captions_train2014.json"
    if content is not None:
        write(ann, content)
    (tmp_path / "images").mkdir()
    assert run("coco", "--annotations", ann, "--images", tmp_path / "images", "--out", tmp_path / "o", *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(ann) in err and expect in err, err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_errors_exit_2_without_traceback(tmp_path):
    res = cli("vg", "--annotations", tmp_path / "region_descriptions.json", "--images", tmp_path,
              "--out", tmp_path / "o", "--no-progress")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "region_descriptions.json: file not found (expected Visual Genome annotations" in res.stderr

    urls = write(tmp_path / "SBU_captioned_photo_dataset_urls.txt", "http://x/1.jpg\nhttp://x/2.jpg\n")
    caps = write(tmp_path / "SBU_captioned_photo_dataset_captions.txt", "only one caption\n")
    assert run("sbu", "--urls", urls, "--captions", caps, "--out", tmp_path / "o", *FAST) == 2
    res = cli("coco", "--annotations", write(tmp_path / "a.json", []), "--images", tmp_path / "nope",
              "--out", tmp_path / "o")
    assert res.returncode == 2 and "nope: directory not found" in res.stderr and "Traceback" not in res.stderr
    res = cli("report", tmp_path / "nothing")
    assert res.returncode == 2 and "not a data_prep output directory" in res.stderr


def test_sbu_and_cc3m_parsing_counts_bad_rows():
    from data_prep import cc3m, sbu
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        js = write(d / "sbu.json", [{"url": "http://a/1_x.jpg", "caption": "One."},
                                    {"image_urls": ["http://a/2.jpg"], "captions": ["Two", "deux"]},
                                    {"url": "ftp://a/3.jpg", "caption": "ftp"}, {"url": "http://a/4.jpg"}, 7])
        p = sbu.parse_json(js, 30)
        assert [(r.url, r.captions, r.image_id) for r in p.rows] == [
            ("http://a/1_x.jpg", ("one",), "1"), ("http://a/2.jpg", ("two", "deux"), "2")]
        assert dict(p.failures) == {"bad row": 2, "empty caption": 1}
        cols = write(d / "sbu-captions-all.json", {"image_urls": ["http://a/5.jpg"], "captions": ["Five!"]})
        assert [r.captions for r in sbu.parse_json(cols, 30).rows] == [("five",)]
        tsv = write(d / "Train_GCC-training.tsv", "A photo of a cat.\thttp://a/c.jpg\n"
                                                  "no tab here\n\t http://a/e.jpg\nx\ty\tz\n")
        p = cc3m.parse(tsv, 30)
        assert [(r.url, r.captions, r.image_id) for r in p.rows] == [("http://a/c.jpg", ("a photo of a cat",), "0")]
        assert dict(p.failures) == {"bad row": 2, "empty caption": 1}
        with pytest.raises(DataPrepError, match="header-less TSV"):
            cc3m.parse(write(d / "x.tsv", "caption,url\nfoo,bar\n"), 30)


# -------------------------------------------------------------------------------- report


def test_report_prints_counts_and_top_errors(tmp_path, coco_dir, capsys):
    ann = write(tmp_path / "captions_train2014.json", official_captions())
    out = tmp_path / "out"
    assert run("coco", "--annotations", ann, "--images", coco_dir, "--out", out, "--prefix", "coco", *FAST) == 0
    assert run("synthetic", "--num", 5, "--out", out, *FAST) == 0
    capsys.readouterr()
    assert run("report", out) == 0
    text = capsys.readouterr().out
    assert f"{out}: 9 samples in 2 shards from 2 source run(s)" in text
    assert "bad row 2" in text and "missing file 1" in text and "complete" in text
    assert "top errors:" in text and "COCO_train2014_000000000005.jpg" in text
    res = cli("report", out)  # the command line works too
    assert res.returncode == 0 and "9 samples" in res.stdout
    assert "shards: all 2 in manifest.json present and intact" in res.stdout


def test_report_names_missing_and_cut_shards(tmp_path, capsys):
    import tarfile

    out = tmp_path / "out"
    assert run("synthetic", "--num", 30, "--shard-size", 10, "--out", out, *FAST) == 0
    names = [s["name"] for s in json.loads((out / "manifest.json").read_text())["shards"]]
    (out / names[0]).unlink()
    with tarfile.open(out / names[1]) as tf:  # cut exactly at the header of the 5th sample's first file
        cut = [m.offset for m in tf.getmembers()][12]
    data = (out / names[1]).read_bytes()
    (out / names[1]).write_bytes(data[:cut])
    capsys.readouterr()
    assert run("report", out) == 0
    text = capsys.readouterr().out
    assert "shards: 2 of 3 in manifest.json missing or cut short, 16 samples lacking" in text
    assert f"MISSING {names[0]}: its 10 samples are listed in manifest.json" in text
    assert f"CUT {names[1]}: 4 of 10 samples readable" in text


# ----------------------------------------------------------------------------- downloads


def test_fetch_resumes_with_range_and_checks_checksums(tmp_path):
    blob = os.urandom(300_000)
    md5 = hashlib.md5(blob).hexdigest()
    with http_server({"/data/big.bin": blob}) as srv:
        srv.cut_once["/data/big.bin"] = 100_000  # the first response breaks off after 100 kB
        path = fetch(f"{srv.url}/data/big.bin", tmp_path / "big.bin", md5=md5, show_progress=False)
        assert path.read_bytes() == blob
        assert [r for _, r in srv.requests] == [None, "bytes=100000-"]  # resumed, not restarted
        # a partial file left by an earlier run is resumed too
        write(tmp_path / "again.bin.part", blob[:250_000])
        fetch(f"{srv.url}/data/big.bin", tmp_path / "again.bin", md5=md5, show_progress=False)
        assert (tmp_path / "again.bin").read_bytes() == blob and srv.requests[-1][1] == "bytes=250000-"
        with pytest.raises(DataPrepError, match="md5 checksum mismatch"):
            fetch(f"{srv.url}/data/big.bin", tmp_path / "bad.bin", md5="0" * 32, show_progress=False)
        assert not (tmp_path / "bad.bin").exists() and not (tmp_path / "bad.bin.part").exists()
        with pytest.raises(DataPrepError, match="HTTP 404"):
            fetch(f"{srv.url}/missing.zip", tmp_path / "missing.zip", show_progress=False)
    with http_server({"/f": blob}, ranges=False) as srv:  # a server that ignores Range restarts cleanly
        write(tmp_path / "f.part", b"garbage")
        assert fetch(f"{srv.url}/f", tmp_path / "f", md5=md5, show_progress=False).read_bytes() == blob


def test_an_existing_download_is_verified_again(tmp_path, capsys):
    blob = os.urandom(50_000)
    md5, sha = hashlib.md5(blob).hexdigest(), hashlib.sha256(blob).hexdigest()
    with http_server({"/f": blob}) as srv:
        dest = write(tmp_path / "f", blob[:-1] + bytes([blob[-1] ^ 1]))  # damaged on disk, same size
        assert fetch(f"{srv.url}/f", dest, sha256=sha, show_progress=False).read_bytes() == blob
        assert len(srv.requests) == 1 and "sha256 checksum mismatch" in capsys.readouterr().err
        assert fetch(f"{srv.url}/f", dest, md5=md5, sha256=sha, size=len(blob), show_progress=False) == dest
        assert len(srv.requests) == 1  # an intact file is not fetched again
        write(dest, blob[:1000])  # cut short: the size alone tells (no checksum published)
        assert fetch(f"{srv.url}/f", dest, size=len(blob), show_progress=False).read_bytes() == blob
        assert len(srv.requests) == 2 and "size 1000 bytes, expected 50000" in capsys.readouterr().err
        with pytest.raises(DataPrepError, match="size 50000 bytes, expected 7 for"):
            fetch(f"{srv.url}/f", tmp_path / "g", size=7, show_progress=False)
        assert not (tmp_path / "g").exists() and not (tmp_path / "g.part").exists()


def _tar(path: Path, members) -> Path:
    """``members``: (TarInfo, bytes or None) pairs written as they are (no name cleaning)."""
    with tarfile.open(path, "w") as t:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize("old_python", [False, True], ids=["data_filter", "no_data_filter"])
def test_extract_refuses_members_outside_the_target(tmp_path, monkeypatch, old_python):
    from data_prep.download import extract

    if old_python:  # Python < 3.10.12: no tarfile.data_filter and extractall() takes no filter=
        monkeypatch.delattr(tarfile, "data_filter")
        original = tarfile.TarFile.extractall

        def extractall(self, path=".", members=None, *, numeric_owner=False, **kw):
            if kw:
                raise TypeError(f"extractall() got an unexpected keyword argument {next(iter(kw))!r}")
            return original(self, path, members, numeric_owner=numeric_owner)

        monkeypatch.setattr(tarfile.TarFile, "extractall", extractall)
    dest = tmp_path / "dest" / "inner"
    dest.mkdir(parents=True)
    setuid = tarfile.TarInfo("a/run.sh")
    setuid.mode = 0o6777
    good = _tar(tmp_path / "good.tar", [(tarfile.TarInfo("a/b.txt"), b"fine"), _link("a/c.txt", "b.txt"),
                                        (setuid, b"#!/bin/sh\n")])
    extract(good, dest)
    assert (dest / "a" / "b.txt").read_bytes() == b"fine" and (dest / "a" / "c.txt").read_bytes() == b"fine"
    assert (dest / "a" / "run.sh").stat().st_mode & 0o7777 == 0o755  # no setuid/setgid, no group/other write
    cases = {"dotdot": ([(tarfile.TarInfo("../escaped.txt"), b"x")], "would be written outside"),
             "absolute": ([(tarfile.TarInfo(str(tmp_path / "abs.txt")), b"x")], "would be written outside"),
             "symlink": ([_link("up", "../../escaped.txt")], "points outside"),
             "abs_symlink": ([_link("etc", "/etc")], "points outside"),
             "hardlink": ([_link("h", "../escaped.txt", tarfile.LNKTYPE)], "points outside"),
             "device": ([_link("dev", "", tarfile.CHRTYPE)], "device or fifo")}
    for name, (members, message) in cases.items():
        bad = _tar(tmp_path / f"{name}.tar", [(tarfile.TarInfo("ok.txt"), b"ok"), *members])
        with pytest.raises(DataPrepError, match=message):
            extract(bad, dest)
        assert not (dest / "ok.txt").exists()  # checked before anything is written
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".txt", ".sh")) == \
        ["b.txt", "c.txt", "run.sh"]


def _zip(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_coco_download_from_mirror(tmp_path, capsys, monkeypatch):
    from data_prep import coco

    train = {f"train2014/COCO_train2014_{i:012d}.jpg": jpeg(30 + i, 30) for i in range(1, 4)}
    val = {"val2014/COCO_val2014_000000000009.jpg": jpeg(33, 33)}
    karpathy = [{"image": "train2014/COCO_train2014_000000000001.jpg", "caption": "One!", "image_id": "coco_1"},
                {"image": "val2014/COCO_val2014_000000000009.jpg", "caption": "Nine.", "image_id": "coco_9"},
                {"image": "train2014/COCO_train2014_000000000002.jpg", "caption": "Two", "image_id": "coco_2"}]
    official = {"annotations/captions_train2014.json": json.dumps(
        {"images": [{"id": 3, "file_name": "COCO_train2014_000000000003.jpg"}],
         "annotations": [{"image_id": 3, "caption": "Three"}]})}
    files = {"/mirror/train2014.zip": _zip(train), "/mirror/val2014.zip": _zip(val),
             "/mirror/coco_karpathy_train.json": json.dumps(karpathy).encode(),
             "/mirror/annotations_trainval2014.zip": _zip(official)}
    out = tmp_path / "out"
    with http_server(files) as srv:
        # the official sizes and sha256 are checked: these stand-in zips are refused as they are
        assert run("coco", "--download", "--mirror", f"{srv.url}/mirror/", "--out", out, *FAST) == 2
        err = capsys.readouterr().err
        assert f"annotations_trainval2014.zip: size {len(files['/mirror/annotations_trainval2014.zip'])} bytes, " \
               "expected 252872794" in err
        stand_ins = {name: replace(remote, size=len(files[f"/mirror/{remote.filename}"]),
                                   sha256=hashlib.sha256(files[f"/mirror/{remote.filename}"]).hexdigest())
                     for name, remote in (("official", coco.DOWNLOADS["official"]),
                                          *((f"images{i}", r) for i, r in enumerate(coco.DOWNLOADS["images"])))}
        monkeypatch.setitem(coco.DOWNLOADS, "official", stand_ins["official"])
        monkeypatch.setitem(coco.DOWNLOADS, "images", [stand_ins["images0"], stand_ins["images1"]])
        srv.cut_once["/mirror/train2014.zip"] = 200
        assert run("coco", "--download", "--mirror", f"{srv.url}/mirror/", "--out", out, *FAST) == 0
        got = {v["json"]["image_id"]: v["txt"] for v in read_shards(out).values()}
        assert got == {"coco_1": "one", "coco_9": "nine", "coco_2": "two"}
        assert any(r == "bytes=200-" for p, r in srv.requests if p.endswith("train2014.zip"))
        # the official annotations came along; a second run downloads nothing again
        n = len(srv.requests)
        ann = out / "_downloads" / "annotations" / "captions_train2014.json"
        assert run("coco", "--download", "--mirror", f"{srv.url}/mirror", "--annotations", ann,
                   "--out", out, *FAST) == 0
        assert len(srv.requests) == n
        assert manifest(out)["sources"]["coco_train2014"]["num_samples"] == 1


def test_sbu_download_checks_the_published_md5(tmp_path, capsys):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, text in (("dataset/SBU_captioned_photo_dataset_urls.txt", b"http://x/1.jpg\n"),
                           ("dataset/SBU_captioned_photo_dataset_captions.txt", b"a caption\n")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            t.addfile(info, io.BytesIO(text))
    with http_server({"/SBUCaptionedPhotoDataset.tar.gz": buf.getvalue()}) as srv:
        assert run("sbu", "--download", "--mirror", srv.url, "--out", tmp_path / "o", *FAST) == 2
    err = capsys.readouterr().err
    assert "SBUCaptionedPhotoDataset.tar.gz: md5 checksum mismatch (expected 9aec147b3488753cf758b4d493422285" in err


def test_vg_download_from_mirror_unpacks_both_image_folders(tmp_path):
    regions = [{"id": i, "regions": [{"image_id": i, "phrase": f"Region of {i}"}]} for i in (1, 2)]
    image_data = [{"image_id": 1, "url": "https://x/VG_100K/1.jpg"}, {"image_id": 2, "url": "https://x/VG_100K_2/2.jpg"}]
    files = {"/region_descriptions.json.zip": _zip({"region_descriptions.json": json.dumps(regions)}),
             "/image_data.json.zip": _zip({"image_data.json": json.dumps(image_data)}),
             "/images.zip": _zip({"VG_100K/1.jpg": jpeg(20, 20)}), "/images2.zip": _zip({"VG_100K_2/2.jpg": jpeg(21, 20)})}
    out = tmp_path / "out"
    with http_server(files) as srv:
        assert run("vg", "--download", "--mirror", srv.url, "--cache-dir", tmp_path / "cache", "--out", out, *FAST) == 0
    assert {v["txt"] for v in read_shards(out).values()} == {"region of 1", "region of 2"}
    assert (tmp_path / "cache" / "VG_100K_2" / "2.jpg").exists()


def test_help_for_every_source(capsys):
    for source in ("coco", "vg", "sbu", "cc3m", "flickr30k", "synthetic", "report"):
        with pytest.raises(SystemExit) as exit_:
            main([source, "--help"])
        assert exit_.value.code == 0
        assert "usage: python -m data_prep " + source in capsys.readouterr().out
