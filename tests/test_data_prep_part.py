"""``data_prep ... --part I/N``: the tasks of a job array split one dataset's shards between them;
together they write every sample exactly once, the same samples one run writes, and the last
task to finish writes the manifest. (The SLURM job array itself: tests/test_slurm.py.)"""
import io
import json

import pytest
from PIL import Image

from data_prep.__main__ import main
from data_prep.writer import Part
from data_prep_fixtures import http_server, jpeg, read_shards


def synthetic(out, *extra) -> int:
    # 40 samples in shards of 6: 7 shards, the last one short
    return main(["synthetic", "--num", "40", "--image-size", "32", "--shard-size", "6", "--out", str(out),
                 "--min-shards", "1", "--no-progress", *map(str, extra)])


def content(samples: dict) -> dict:
    return {k: (v["txt"], v["jpg"], v["json"]) for k, v in samples.items()}


def test_parts_write_every_sample_once_and_the_last_writes_the_manifest(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert synthetic(whole) == 0

    # a stale partial file of another task's shard (being written right now, say) is not deleted
    split.mkdir()
    busy = split / ".synthetic-000001.tar.partial"
    busy.write_bytes(b"another task is writing this")
    assert synthetic(split, "--part", "2/3") == 0
    assert sorted(p.name for p in split.glob("*.tar")) == ["synthetic-000002.tar", "synthetic-000005.tar"]
    assert busy.exists() and not (split / "manifest.json").exists()
    assert synthetic(split, "--part", "0/3") == 0
    assert not (split / "manifest.json").exists()  # shards 1 and 4 are still missing
    assert synthetic(split, "--part", "1/3") == 0  # the last task: its own stale partial is gone
    assert not busy.exists()

    m = json.loads((split / "manifest.json").read_text())
    assert m["sources"]["synthetic"]["complete"] and m["num_samples"] == 40 and m["num_shards"] == 7
    assert m == json.loads((whole / "manifest.json").read_text())
    samples = read_shards(split)
    assert sorted(samples) == [f"synthetic-{i:09d}" for i in range(40)]  # each sample exactly once
    assert content(samples) == content(read_shards(whole))
    for s in range(7):  # and in the same shard as the whole run puts it
        assert {k for k, v in samples.items() if v["shard"] == f"synthetic-{s:06d}.tar"} == \
            {f"synthetic-{i:09d}" for i in range(6 * s, min(40, 6 * s + 6))}
    run = json.loads((split / "_progress" / "synthetic" / "run.json").read_text())
    assert run["complete"]


def test_part_shards_cover_every_index_once():
    for count in (1, 2, 3, 8, 13):
        for num_shards in (0, 1, 5, 12, 40):
            got = sorted(i for index in range(count) for i in Part(index, count).shards(num_shards))
            assert got == list(range(num_shards)), (count, num_shards)


@pytest.mark.parametrize("extra, message", [
    (["--part", "3/3"], "expected I/N with 0 <= I < N"),
    (["--part", "1"], "expected I/N"),
    (["--part", "0/2", "--overwrite"], "--overwrite cannot be combined with --part"),
])
def test_bad_part_options_are_one_clear_line(tmp_path, capsys, extra, message):
    try:
        code = synthetic(tmp_path / "out", *extra)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.tar"))


def test_download_with_part_is_refused(tmp_path, capsys):
    assert main(["coco", "--download", "--out", str(tmp_path), "--part", "0/2"]) == 2
    assert "--download cannot be combined with --part" in capsys.readouterr().err
    assert not (tmp_path / "_downloads").exists()


def test_url_source_part_downloads_only_its_own_rows(tmp_path):
    """cc3m through img2dataset, task 1 of 3: it fetches its own rows only, writes its shard,
    removes its staging and leaves the manifest to the last task."""
    files = {f"/img/{i}.jpg": jpeg(30 + i, 24, (40 * i, 250 - 40 * i, 90)) for i in range(6)}
    with http_server(files) as srv:
        tsv = tmp_path / "Train_GCC-training.tsv"
        tsv.write_text("".join(f"caption number {i}\t{srv.url}/img/{i}.jpg\n" for i in range(6)))
        out = tmp_path / "out"
        # shards of 2 rows: 0-1, 2-3, 4-5; task 1/3 owns shard 1 = rows 2 and 3
        assert main(["cc3m", "--tsv", str(tsv), "--out", str(out), "--part", "1/3", "--shard-size", "2",
                     "--image-size", "16", "--processes", "1", "--threads", "1", "--timeout", "5",
                     "--no-progress", "--min-shards", "1"]) == 0
    assert sorted(path for path, _ in srv.requests) == ["/img/2.jpg", "/img/3.jpg"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["cc3m-000001.tar"]
    samples = read_shards(out)
    assert sorted(samples) == ["cc3m-000000002", "cc3m-000000003"]
    assert [samples[k]["txt"] for k in sorted(samples)] == ["caption number 2", "caption number 3"]
    assert Image.open(io.BytesIO(samples["cc3m-000000002"]["jpg"])).size[1] == 16
    assert not (out / "manifest.json").exists()  # shards 0 and 2 are the other tasks'
    assert not (out / "_img2dataset").exists()  # this task's staging is removed
