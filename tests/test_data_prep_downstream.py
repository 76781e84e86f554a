"""data_prep downstream sources (VQAv2, OK-VQA, GQA, NLVR2, SNLI-VE, NoCaps) on tiny inputs in the
published formats: the shard schema, bad rows counted by reason, the task and chance level in
the manifest, and one-line errors for malformed files."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from data_prep.__main__ import main
from data_prep_fixtures import http_server, read_shards
from data_prep_fixtures import downstream as fx

REPO = Path(__file__).resolve().parents[1]
FAST = ["--no-progress", "--workers", "1", "--min-shards", "1"]


def run(*argv) -> int:
    return main([str(a) for a in argv])


def source(out, prefix) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())["sources"][prefix]


def by(samples, field) -> dict:
    return {v["json"][field]: v for v in samples.values()}


def test_vqav2_val_and_test_dev(tmp_path):
    f = fx.vqa(tmp_path)
    out = tmp_path / "out"
    assert run("vqav2", "--questions", f["questions"], "--annotations", f["annotations"], "--images", f["images"],
               "--out", out, "--shard-size", 2, *FAST) == 0
    src = source(out, "vqav2_val")
    assert src["failures"] == {"missing file": 1, "empty text": 1, "bad row": 1, "not an image": 1}
    assert src["num_samples"] == 3 and src["eval"] is True and src["task"] == "vqa" and src["split"] == "val"
    assert src["chance"] == pytest.approx(1 / 5)  # five annotated questions, five different answers
    samples = by(read_shards(out, "vqav2_val"), "question_id")
    assert sorted(samples) == [10, 11, 20]
    s = samples[11]
    assert s["txt"] == "Is it sunny?" and Image.open(io.BytesIO(s["jpg"])).size == (41, 30)
    assert {k: s["json"][k] for k in ("task", "dataset", "question", "answer_type", "question_type", "image_id")} == {
        "task": "vqa", "dataset": "vqav2", "question": "Is it sunny?", "answer_type": "yes/no",
        "question_type": "is it", "image_id": 1}
    assert s["json"]["answers"] == ["yes"] * 9 + ["no"] and s["json"]["source"] == "vqav2"
    assert samples[20]["json"]["answers"] == ["red"] * 5 + ["Red bus"] * 5  # raw, as given

    assert run("vqav2", "--questions", f["testdev"], "--images", f["images"], "--out", out, *FAST) == 0
    test = read_shards(out, "vqav2_testdev")
    (s,) = test.values()
    assert s["json"]["answers"] == [] and s["json"]["question_id"] == 70 and s["json"]["answer_type"] is None
    assert source(out, "vqav2_testdev")["chance"] is None and source(out, "vqav2_testdev")["eval"] is True


def test_okvqa_keeps_the_scored_answers(tmp_path):
    f = fx.vqa(tmp_path, okvqa=True)
    out = tmp_path / "out"
    assert run("okvqa", "--questions", f["questions"], "--annotations", f["annotations"], "--images", f["images"],
               "--out", out, *FAST) == 0
    samples = by(read_shards(out, "okvqa_val"), "question_id")
    assert samples[10]["json"]["dataset"] == "okvqa" and samples[10]["json"]["answers"] == ["2"] * 6 + ["3"] * 4
    assert source(out, "okvqa_val")["num_samples"] == 3


def test_gqa_balanced_questions(tmp_path):
    f = fx.gqa(tmp_path)
    out = tmp_path / "out"
    assert run("gqa", "--questions", f["questions"], "--images", f["images"], "--out", out, *FAST) == 0
    src = source(out, "gqa_testdev")
    assert src["failures"] == {"missing file": 1, "empty text": 1, "bad row": 1} and src["num_samples"] == 2
    assert src["chance"] == pytest.approx(1 / 3)  # the parsed rows: white, no, left
    s = by(read_shards(out, "gqa_testdev"), "question_id")["201"]
    assert s["txt"] == "What color is the cup?"
    assert {k: s["json"][k] for k in ("dataset", "answers", "answer_type", "question_type", "image_id",
                                      "full_answer")} == {
        "dataset": "gqa", "answers": ["white"], "answer_type": "query", "question_type": "objColor",
        "image_id": "n1", "full_answer": "The cup is white."}
    assert run("gqa", "--questions", f["test"], "--images", f["images"], "--out", out, *FAST) == 0
    assert [v["json"]["answers"] for v in read_shards(out, "gqa_test").values()] == [[]]


def test_nlvr2_pairs_and_labels(tmp_path):
    f = fx.nlvr2(tmp_path)
    out = tmp_path / "out"
    assert run("nlvr2", "--annotations", f["dev"], "--images", f["images"], "--out", out, *FAST) == 0
    src = source(out, "nlvr2_dev")
    assert src["failures"] == {"missing file": 1, "unknown label": 1, "empty text": 1, "bad row": 2}
    assert src["num_samples"] == 2 and src["task"] == "nlvr2" and src["chance"] == pytest.approx(2 / 3)
    assert json.loads((out / "manifest.json").read_text())["schema"]["left.jpg"] == "left image"
    samples = by(read_shards(out, "nlvr2_dev"), "identifier")
    s = samples["dev-0-0-1"]
    assert s["txt"] == "The left image has a cat." and s["json"]["label"] is False
    assert samples["dev-0-0-0"]["json"]["label"] is True
    left, right = (Image.open(io.BytesIO(s[k])) for k in ("left.jpg", "right.jpg"))
    assert left.format == right.format == "JPEG" and left.size == (46, 20)  # PNG re-encoded
    assert s["json"]["original_size"] == {"left": [46, 20], "right": [46, 20]}
    assert s["json"]["images"] == ["dev-0-0-img0.png", "dev-0-0-img1.png"] and "jpg" not in s
    assert run("nlvr2", "--annotations", f["train"], "--images", f["images"], "--out", out, *FAST) == 0
    (t,) = read_shards(out, "nlvr2").values()  # train/7/train-5-1-img0.png via "directory"
    assert t["json"]["identifier"] == "train-5-1-0" and source(out, "nlvr2")["eval"] is False


def test_snli_ve_three_labels(tmp_path):
    f = fx.snli_ve(tmp_path)
    out = tmp_path / "out"
    assert run("snli_ve", "--annotations", f["annotations"], "--images", f["images"], "--out", out, *FAST) == 0
    src = source(out, "snli_ve_dev")
    assert src["failures"] == {"missing file": 1, "unknown label": 1, "empty text": 1, "bad row": 1}
    assert src["num_samples"] == 3 and src["chance"] == pytest.approx(2 / 4)
    samples = by(read_shards(out, "snli_ve_dev"), "pair_id")
    assert {p: (s["json"]["label"], s["json"]["label_id"]) for p, s in samples.items()} == {
        "p1": ("entailment", 0), "p2": ("neutral", 1), "p3": ("contradiction", 2)}
    assert samples["p3"]["txt"] == "Nobody is there." and samples["p3"]["json"]["image_id"] == "101"


def test_nocaps_local_images(tmp_path):
    f = fx.nocaps(tmp_path)
    out = tmp_path / "out"
    assert run("nocaps", "--annotations", f["annotations"], "--images", f["images"], "--out", out, *FAST) == 0
    src = source(out, "nocaps_val")
    assert src["failures"] == {"missing file": 1, "empty caption": 1} and src["task"] == "caption"
    samples = by(read_shards(out, "nocaps_val"), "image_id")
    assert samples[1]["json"]["domain"] == "out-domain" and samples[1]["txt"] == "image b caption 0"
    assert len(samples[1]["json"]["captions"]) == 10 and samples[1]["json"]["open_images_id"] == "oib"


def test_nocaps_urls_through_img2dataset(tmp_path):
    f0 = fx.nocaps(tmp_path)
    with http_server(f0["served"]) as srv:
        f = fx.nocaps(tmp_path, srv.url)
        out = tmp_path / "out"
        res = subprocess.run([sys.executable, "-m", "data_prep", "nocaps", "--annotations", f["annotations"],
                              "--out", out, "--processes", "1", "--threads", "1", "--timeout", "5", *FAST[:1],
                              *FAST[-2:]], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    src = source(out, "nocaps_val")
    assert src["failures"] == {"404": 1, "empty caption": 1} and src["task"] == "caption"
    samples = by(read_shards(out, "nocaps_val"), "image_id")
    assert samples["0"]["json"]["domain"] == "in-domain" and samples["0"]["json"]["url"].endswith("/nocaps/a.jpg")
    assert samples["1"]["json"]["captions"][0] == "image b caption 0"


@pytest.mark.parametrize("name, args, content, expect", [
    ("vqav2", ["--questions"], [], "expected VQA questions JSON"),
    ("vqav2", ["--questions"], {"data_subtype": "val2015", "questions": []}, "'data_subtype' is 'val2015'"),
    ("gqa", ["--questions"], [1, 2], "expected GQA questions JSON"),
    ("nlvr2", ["--annotations"], "just text\n", "expected NLVR2 JSON lines"),
    ("snli_ve", ["--annotations"], "", "found an empty file"),
    ("nocaps", ["--annotations"], {"images": 1}, "expected NoCaps captions JSON"),
])
def test_malformed_annotation_file_is_one_line(tmp_path, capsys, name, args, content, expect):
    path = tmp_path / "input.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    (tmp_path / "images").mkdir()
    assert run(name, *args, path, "--images", tmp_path / "images", "--out", tmp_path / "o", *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and expect in err, err


def test_help_for_every_downstream_source(capsys):
    for name in ("vqav2", "okvqa", "gqa", "nlvr2", "snli_ve", "nocaps", "synthetic_vqa", "synthetic_nlvr2",
                 "synthetic_ve"):
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0 and "usage: python -m data_prep " + name in capsys.readouterr().out


def test_rerun_resumes_and_other_options_are_refused(tmp_path, capsys):
    f = fx.snli_ve(tmp_path)
    out = tmp_path / "out"
    argv = ["snli_ve", "--annotations", f["annotations"], "--images", f["images"], "--out", out, "--shard-size", 2]
    assert run(*argv, *FAST) == 0
    first = read_shards(out)
    (out / "snli_ve_dev-000001.tar").unlink()  # as if killed before the last shard was renamed
    assert run(*argv, *FAST) == 0
    assert read_shards(out) == first and {s["shard"] for s in first.values()} == {
        "snli_ve_dev-000000.tar", "snli_ve_dev-000001.tar"}
    capsys.readouterr()
    assert run(*argv, "--image-size", 64, *FAST) == 2
    assert "already holds 'snli_ve_dev' shards made with different options: image_size=384" in capsys.readouterr().err
