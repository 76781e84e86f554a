"""Shard specs: ``::``-joined sources, brace expansion, per-source weights, epoch sizes.

A source is a brace pattern (``/data/cc3m/cc3m-{000000..000331}.tar``), a single tar, or a
directory written by ``data_prep`` (its ``manifest.json`` lists the shards). Sizes come from
the directory's ``manifest.json`` (``shards: [{name, num_samples}]``) or open_clip's
``sizes.json`` (``{name: num_samples}``).

Shards are local paths (or ``file:``), ``http(s)://``, ``s3://`` or ``gs://`` URLs, opened by
:func:`open_shard` without a shell: webdataset 0.2's own opener runs ``curl '{url}'`` through
``sh``, so a quote in a URL would run code. ``pipe:CMD`` specs run ``CMD`` in a shell and are
refused unless the process opted in with :func:`allow_pipe_shards` (the CLIs'
``--allow-pipe-shards`` flag; never a config value, since configs travel with downloaded runs).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import braceexpand

from pipeline.config import ConfigError

REMOTE_SCHEMES = ("http", "https", "s3", "gs")
_CLI = {"s3": ("aws", "s3", "cp", "--quiet"), "gs": ("gsutil", "-q", "cat")}  # + url (+ "-" for aws)
_allow_pipe = False


class ShardSpecError(ConfigError):
    """A shard spec that cannot be used; a ConfigError, so the CLIs exit 2 with its one line."""


def allow_pipe_shards(allow: bool = True) -> None:
    """Let ``pipe:`` specs run their shell command (the CLIs call this for ``--allow-pipe-shards``)."""
    global _allow_pipe
    _allow_pipe = bool(allow)


def _check_url(url: str) -> None:
    if url.startswith("pipe:"):
        if not _allow_pipe:
            raise ShardSpecError(f"{url!r}: a pipe: shard runs a shell command; refused unless "
                                 "--allow-pipe-shards is passed on the command line")
        return
    scheme = urlparse(url).scheme
    if "://" in url and scheme not in REMOTE_SCHEMES + ("file",):
        raise ShardSpecError(f"{url!r}: unsupported URL scheme {scheme!r}; use a local path or "
                             f"{'/'.join(REMOTE_SCHEMES)} URLs")


@dataclass(frozen=True)
class Source:
    spec: str  # the text of this source in the spec
    urls: tuple[str, ...]  # its shards, expanded
    sizes: tuple[int | None, ...]  # samples per shard (None where unknown)

    @property
    def num_samples(self) -> int | None:
        if any(s is None for s in self.sizes):
            return None
        return int(sum(self.sizes))  # type: ignore[arg-type]


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _read_sizes(directory: str) -> dict[str, int]:
    """Samples per shard file name from ``manifest.json`` or ``sizes.json`` in ``directory``."""
    manifest = os.path.join(directory, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            data = json.load(f)
        shards = data.get("shards") or []
        return {os.path.basename(s["name"]): int(s["num_samples"]) for s in shards}
    sizes = os.path.join(directory, "sizes.json")
    if os.path.isfile(sizes):
        with open(sizes) as f:
            return {os.path.basename(k): int(v) for k, v in json.load(f).items()}
    return {}


def _manifest_urls(directory: str) -> list[str]:
    manifest = os.path.join(directory, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            shards = json.load(f).get("shards") or []
        return [os.path.join(directory, os.path.basename(s["name"])) for s in shards]
    return sorted(str(p) for p in Path(directory).glob("*.tar"))


def _local(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url[len("file:"):] if url.startswith("file:") else url


def expand_source(spec: str) -> Source:
    spec = spec.strip()
    if not spec:
        raise ShardSpecError("empty source in shard spec")
    if not _is_remote(spec) and os.path.isdir(spec):
        urls = _manifest_urls(spec)
        if not urls:
            raise ShardSpecError(f"{spec}: directory has no manifest.json shards and no *.tar files")
    else:
        urls = list(braceexpand.braceexpand(spec))
        for url in urls:
            _check_url(url)
        local = [_local(u) for u in urls if not _is_remote(u)]
        # some missing shards of a pattern are counted while reading; none at all is a wrong path
        if local and not any(os.path.exists(u) for u in local):
            what = "no such file or directory" if len(local) == 1 else f"none of its {len(local)} shards exists"
            raise ShardSpecError(f"{spec}: {what}")
    sizes: list[int | None] = []
    cache: dict[str, dict[str, int]] = {}
    for url in urls:
        if _is_remote(url):
            sizes.append(None)
            continue
        directory = os.path.dirname(url) or "."
        if directory not in cache:
            cache[directory] = _read_sizes(directory)
        sizes.append(cache[directory].get(os.path.basename(url)))
    return Source(spec=spec, urls=tuple(urls), sizes=tuple(sizes))


def parse_shard_spec(spec: str, weights: list[float] | None = None) -> tuple[list[Source], list[float] | None]:
    """Split ``spec`` on ``::`` into sources; ``weights`` (one per source) are checked."""
    if not spec or not spec.strip():
        raise ShardSpecError("no shards given")
    sources = [expand_source(part) for part in spec.split("::")]
    if weights is not None:
        if len(weights) != len(sources):
            raise ShardSpecError(f"{len(sources)} sources but {len(weights)} weights")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ShardSpecError(f"weights must be >= 0 with a positive sum, got {weights}")
    return sources, weights


def check_shard_spec(spec: str, key: str, weights: list[float] | None = None) -> list[Source]:
    """:func:`parse_shard_spec` with errors that name the config key or flag the spec came from."""
    try:
        return parse_shard_spec(spec, weights)[0]
    except ShardSpecError as err:
        raise ShardSpecError(f"{key}={spec!r}: {err}") from None


def shard_weights(sources: list[Source], weights: list[float] | None) -> tuple[list[str], list[float]]:
    """All urls with the draw weight of each, for sampling shards with replacement.

    A draw of shard ``u`` yields ``size_u`` samples. Unweighted, every shard is equally likely,
    so every sample is. Weighted, a shard of source ``s`` gets ``w_s / samples_s``: the expected
    share of samples from ``s`` is then ``w_s / sum(w)``, uniform within the source (sizes
    unknown: ``w_s / shards_s``, i.e. shards assumed equal)."""
    urls: list[str] = []
    out: list[float] = []
    for i, src in enumerate(sources):
        n, total = len(src.urls), src.num_samples
        if weights is None:
            per = [1.0] * n
        else:
            w = float(weights[i])
            per = [w / total] * n if total else [w / n] * n
        urls.extend(src.urls)
        out.extend(per)
    return urls, out


def total_samples(sources: list[Source]) -> int | None:
    n = [s.num_samples for s in sources]
    return None if any(x is None for x in n) else int(sum(n))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- opening


class _ProcessReader(io.RawIOBase):
    """stdout of a child started from an argv list; a failing exit is an error naming ``url``."""

    def __init__(self, argv: list[str] | str, url: str, shell: bool = False):
        super().__init__()
        self.url = url
        # stderr to a file, not a pipe: a chatty child must not block on a pipe nobody reads
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, shell=shell, stdout=subprocess.PIPE, stderr=self.stderr)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.proc.stdout.readinto(buffer)
        if n == 0:
            self._check(self.proc.wait())
        return n

    def _check(self, status: int) -> None:
        if status not in (0, -13, 141):  # 141 / -SIGPIPE: the reader stopped before the end
            self.stderr.seek(0)
            err = self.stderr.read().decode(errors="replace").strip().splitlines()
            what = self.proc.args[0] if isinstance(self.proc.args, list) else "the pipe: command"
            raise OSError(f"{self.url}: {what} exited with status {status}: {err[-1] if err else 'no message'}")

    def close(self) -> None:
        if not self.closed:
            self.proc.stdout.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.stderr.close()
        super().close()


def _cli_argv(url: str) -> list[str]:
    scheme = urlparse(url).scheme
    tool = _CLI[scheme]
    if shutil.which(tool[0]) is None:
        raise OSError(f"{url}: {scheme}:// shards are read with the {tool[0]!r} command, which is not on PATH")
    return [*tool, url, *(["-"] if scheme == "s3" else [])]


def open_shard(url: str, *, timeout_s: float = 60.0, retries: int = 3) -> IO[bytes]:
    """A binary stream of shard ``url``, opened without a shell (``pipe:`` only when allowed).

    http(s) is streamed by urllib (opening is retried ``retries`` times), s3/gs by the ``aws`` /
    ``gsutil`` command given the URL as one argv item."""
    _check_url(url)
    if url.startswith("pipe:"):
        return io.BufferedReader(_ProcessReader(url[len("pipe:"):], url, shell=True))
    scheme = urlparse(url).scheme if "://" in url else ""
    if scheme in ("http", "https"):
        for attempt in range(retries):
            try:
                return urllib.request.urlopen(url, timeout=timeout_s)
            except urllib.error.HTTPError as err:
                if err.code < 500 or attempt == retries - 1:
                    raise OSError(f"{url}: HTTP {err.code} {err.reason}") from None
            except OSError as err:
                if attempt == retries - 1:
                    raise OSError(f"{url}: {err}") from None
            time.sleep(2.0 ** attempt)
    if scheme in _CLI:
        return io.BufferedReader(_ProcessReader(_cli_argv(url), url))
    return open(_local(url), "rb")
