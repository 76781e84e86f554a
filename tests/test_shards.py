"""Shard specs run no code: http(s) in Python, s3/gs through an argv list, ``pipe:`` only with
``--allow-pipe-shards``; a missing or empty shard source is one error line naming its key."""
import http.server
import os
import stat
import threading
from pathlib import Path

import pytest
import webdataset as wds

from pipeline.config import load_config, save_config
from pipeline.data import build_eval_loader
from pipeline.data.shards import ShardSpecError, allow_pipe_shards, open_shard, parse_shard_spec
from tests.helpers_train import write_shards


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shard")
    write_shards(root, shards=1, per_shard=5, prefix="s")
    return root / "s-000000.tar"


@pytest.fixture
def no_pipe():
    allow_pipe_shards(False)
    yield
    allow_pipe_shards(False)


@pytest.fixture
def server(shard):
    """127.0.0.1 HTTP server answering every GET with the shard's bytes; records the paths asked."""
    data, paths = shard.read_bytes(), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            paths.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", paths
    httpd.shutdown()
    httpd.server_close()


def _injecting_url(base: str, marker: Path) -> str:
    # inside webdataset's `curl '{url}'` the quote ends the argument and `touch MARKER` runs
    return f"{base}/s';touch${{IFS}}{marker};'.tar"


def test_http_url_with_a_quote_is_read_without_a_shell(server, tmp_path):
    base, paths = server
    theirs = tmp_path / "theirs"
    with pytest.raises(Exception):  # the payload is real: webdataset's opener runs it (curl then fails)
        with wds.gopen(_injecting_url(base, theirs)) as stream:
            stream.read()
    assert theirs.exists()

    ours = tmp_path / "ours"
    url = _injecting_url(base, ours)
    keys = [k for b in build_eval_loader(url, image_size=16, batch_size=2) for k in b["key"]]
    assert len(keys) == 5
    assert not ours.exists()
    assert paths[-1] == url[len(base):]  # the quote reached the server as part of the path


def test_s3_and_gs_urls_go_to_their_cli_as_one_argv_item(shard, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("aws", "gsutil"):
        script = bin_dir / tool
        # records its argv one per line, then streams the shard like `aws s3 cp URL -` would
        script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/{tool}.argv"\ncat "{shard}"\n')
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    marker = tmp_path / "marker"
    for url, tool in ((f"s3://bucket/s';touch {marker};'.tar", "aws"), (f"gs://bucket/s'$(touch {marker}).tar", "gsutil")):
        keys = [k for b in build_eval_loader(url, image_size=16, batch_size=5) for k in b["key"]]
        assert len(keys) == 5
        assert url in (tmp_path / f"{tool}.argv").read_text().splitlines()
    assert not marker.exists()


def test_a_failing_download_names_the_url(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "aws").write_text("#!/bin/sh\necho 'An error occurred (404)' >&2\nexit 1\n")
    (bin_dir / "aws").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(OSError, match=r"s3://b/x.tar: aws exited with status 1: An error occurred \(404\)"):
        open_shard("s3://b/x.tar").read()


def test_pipe_specs_need_the_opt_in(shard, tmp_path, no_pipe):
    spec = f"pipe:cat {shard}"
    with pytest.raises(ShardSpecError, match="--allow-pipe-shards"):
        parse_shard_spec(spec)
    with pytest.raises(ShardSpecError, match="--allow-pipe-shards"):
        open_shard(spec)
    with pytest.raises(ShardSpecError, match="unsupported URL scheme 'sftp'"):
        parse_shard_spec("sftp://host/x.tar")
    allow_pipe_shards(True)
    keys = [k for b in build_eval_loader(spec, image_size=16, batch_size=5) for k in b["key"]]
    assert len(keys) == 5


def test_train_cli_refuses_pipe_without_the_flag_and_accepts_it_with(shard, tmp_path, capsys, no_pipe):
    from pipeline.train.__main__ import main

    args = ["--config", "tiny_clip", f"train.run_dir={tmp_path / 'run'}", f"data.train_shards=pipe:cat {shard}"]
    assert main(args + [f"eval.shards={shard}"]) == 2
    assert "--allow-pipe-shards" in capsys.readouterr().err
    # with the flag the pipe: spec passes; the next check (a missing eval set) is what stops it
    assert main(["--allow-pipe-shards", *args, "eval.every=10", f"eval.shards={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: eval.shards=") and "no such file or directory" in err and "allow" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("layout", ["missing", "empty"])
def test_train_cli_names_data_train_shards(layout, tmp_path, capsys):
    from pipeline.train.__main__ import main

    shards = tmp_path / "shards"
    if layout == "empty":
        shards.mkdir()
    for extra in ([], ["data.train_num_samples=100"]):  # with a size the run used to start, then die
        assert main(["--config", "tiny_clip", f"train.run_dir={tmp_path / 'run'}", f"data.train_shards={shards}",
                     *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert err.startswith(f"config error: data.train_shards='{shards}': {shards}: ")
        assert ("no such file or directory" if layout == "missing" else "no manifest.json shards") in err
    assert not (tmp_path / "run").exists()


def test_eval_cli_names_the_key_of_the_missing_shards(shard, tmp_path, capsys):
    from pipeline.eval.__main__ import main

    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("tiny_clip", [f"eval.shards={tmp_path / 'gone'}"]), run / "config.yaml")
    assert main(["retrieval", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: eval.shards (in {run / 'config.yaml'})='{tmp_path / 'gone'}': {tmp_path / 'gone'}: no such file or directory"
    assert main(["retrieval", "--run", str(run), "--shards", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: --shards='{tmp_path}': {tmp_path}: directory has no")
