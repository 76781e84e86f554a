"""data_prep URL sources (SBU, CC3M) through img2dataset, against an HTTP server on 127.0.0.1
that serves good images, a 404, an HTML page in place of an image and a truncated JPEG."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from data_prep_fixtures import HTML, http_server, jpeg, read_shards, truncated_jpeg

REPO = Path(__file__).resolve().parents[1]
# one download process with one thread keeps these runs small and ordered on 2 cores
URL_OPTS = ["--processes", "1", "--threads", "1", "--timeout", "5", "--no-progress", "--min-shards", "1"]


def cli_args(*argv):
    return [sys.executable, "-m", "data_prep", *map(str, argv)]


ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def served_files() -> dict:
    return {"/img/0.jpg": jpeg(40, 30, (250, 0, 0)), "/img/1.jpg": jpeg(41, 30, (0, 250, 0)),
            "/img/2.jpg": jpeg(42, 30, (0, 0, 250)), "/img/3.jpg": jpeg(43, 30), "/img/4.jpg": jpeg(44, 30),
            "/img/big.jpg": jpeg(200, 150), "/img/tiny.jpg": jpeg(8, 8), "/img/page.jpg": HTML,
            "/img/trunc.jpg": truncated_jpeg()}


def test_sbu_text_files_resume_after_kill(tmp_path):
    with http_server(served_files(), delay=0.4) as srv:
        lines = [("/img/0.jpg", "A red square."), ("/img/1.jpg", "Green, isn't it?"), ("/img/gone.jpg", "404"),
                 ("/img/page.jpg", "html"), ("/img/trunc.jpg", "truncated"), ("/img/2.jpg", "Blue!"),
                 ("/img/tiny.jpg", "too small"), ("/img/3.jpg", "three"), ("not-a-url", "bad"),
                 ("/img/4.jpg", "   "), ("/img/4.jpg", "Four"), ("/img/big.jpg", "A big one")]
        urls = tmp_path / "SBU_captioned_photo_dataset_urls.txt"
        caps = tmp_path / "SBU_captioned_photo_dataset_captions.txt"
        urls.write_text("".join((srv.url + u if u.startswith("/") else u) + "\n" for u, _ in lines))
        caps.write_text("".join(c + "\n" for _, c in lines))
        out = tmp_path / "out"
        args = ["sbu", "--urls", urls, "--captions", caps, "--out", out, "--shard-size", 3,
                "--image-size", 64, "--min-image-size", 16, *URL_OPTS]

        proc = subprocess.Popen(cli_args(*args), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        first = out / "sbu-000000.tar"
        deadline = time.time() + 90
        while not (out / "_progress" / "sbu" / "000000.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the first shard never appeared"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: img2dataset's workers too
        proc.wait()
        proc.stderr.close()
        assert not (out / "sbu-000003.tar").exists(), "the run finished before it could be killed"
        kept = (first.stat().st_ino, first.stat().st_mtime_ns)
        srv.delay = 0.0
        n_before = len(srv.requests)

        res = subprocess.run(cli_args(*args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        again = [p for p, _ in srv.requests[n_before:]]
        assert "/img/0.jpg" not in again and "/img/gone.jpg" not in again  # shard 0 was not fetched again
        assert (first.stat().st_ino, first.stat().st_mtime_ns) == kept

    m = json.loads((out / "manifest.json").read_text())
    src = m["sources"]["sbu"]
    assert src["complete"] and src["num_rows"] == 12 and m["num_samples"] == 6
    assert src["failures"] == {"404": 1, "not an image": 1, "truncated": 1, "too small": 1, "bad row": 1,
                               "empty caption": 1}
    assert [s["num_samples"] for s in m["shards"]] == [2, 1, 2, 1]  # 10 URL rows in shards of 3
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {f"sbu-{i:06d}.tar": n for i, n in enumerate([2, 1, 2, 1])}
    samples = read_shards(out)
    # the samples an uninterrupted run gives: keys in row order, each exactly once
    assert sorted(samples) == [f"sbu-{i:09d}" for i in (0, 1, 5, 7, 8, 9)]
    assert [samples[k]["txt"] for k in sorted(samples)] == ["a red square", "green isnt it", "blue", "three",
                                                            "four", "a big one"]
    big = samples["sbu-000000009"]["json"]
    assert big["source"] == "sbu" and big["url"].endswith("/img/big.jpg") and big["captions"] == ["a big one"]
    assert big["original_size"] == [200, 150] and big["size"] == [85, 64]  # keep_ratio, shorter side 64
    assert Image.open(io.BytesIO(samples["sbu-000000009"]["jpg"])).size == (85, 64)
    red = Image.open(io.BytesIO(samples["sbu-000000000"]["jpg"])).convert("RGB").getpixel((20, 15))
    assert red[0] > 200 and red[1] < 60
    assert not (out / "_img2dataset").exists()  # staging removed once every shard is converted

    report = subprocess.run(cli_args("report", out), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert report.returncode == 0 and "404" in report.stdout and "/img/gone.jpg" in report.stdout


def test_cc3m_tsv_through_img2dataset(tmp_path):
    png = io.BytesIO()
    Image.new("RGBA", (60, 40), (0, 0, 255, 128)).save(png, "PNG")
    files = {**served_files(), "/c/png": png.getvalue()}
    with http_server(files) as srv:
        tsv = tmp_path / "Train_GCC-training.tsv"
        tsv.write_text(f"A dog on a beach.\t{srv.url}/img/big.jpg\n"
                       f"gone\t{srv.url}/img/missing.jpg\n"
                       f"web page\t{srv.url}/img/page.jpg\n"
                       "a line without a tab\n"
                       f"Transparent PNG, served without an extension\t{srv.url}/c/png\n")
        out = tmp_path / "out"
        res = subprocess.run(cli_args("cc3m", "--tsv", tsv, "--out", out, "--shard-size", 2, "--image-size", 32,
                                      "--resize-mode", "center_crop", *URL_OPTS[:-2]),
                             cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warning: cc3m: 2 shard(s)" in res.stderr  # fewer than the default 64 readers
    m = json.loads((out / "manifest.json").read_text())
    src = m["sources"]["cc3m"]
    assert src["failures"] == {"404": 1, "not an image": 1, "bad row": 1}
    assert m["num_samples"] == 2 and json.loads((out / "sizes.json").read_text()) == {
        "cc3m-000000.tar": 1, "cc3m-000001.tar": 1}
    samples = read_shards(out)
    assert {v["txt"] for v in samples.values()} == {"a dog on a beach", "transparent png served without an extension"}
    for v in samples.values():
        assert v["json"]["size"] == [32, 32] and Image.open(io.BytesIO(v["jpg"])).format == "JPEG"
    assert samples["cc3m-000000000"]["json"]["original_size"] == [200, 150]
    assert samples["cc3m-000000003"]["json"]["image_id"] == "4"  # the TSV line, counted from 0
