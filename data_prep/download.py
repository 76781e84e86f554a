"""Resumable HTTP downloads of official dataset files, with a mirror override and checksums.

A download streams into ``NAME.part`` and resumes it with an HTTP ``Range`` request after
an interruption (in the same run, up to ``retries`` times, or in a later run). The file is
renamed to ``NAME`` only once complete and verified against the published size and checksums
(where there are any). An existing ``NAME`` is verified again on every run (a file damaged
on disk, or copied in by hand, is not trusted); one that fails is deleted and downloaded again.
"""
import hashlib
import http.client
import os
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import DataPrepError

CHUNK = 1 << 20
USER_AGENT = "elip-data-prep/0.1 (+resumable downloader)"


@dataclass(frozen=True)
class Remote:
    """An official file: its URL, published checksum (if any) and whether to unpack it."""
    url: str
    md5: str | None = None
    sha256: str | None = None
    extract: bool = False
    size: int | None = None  # bytes, where published

    @property
    def filename(self) -> str:
        return self.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def resolve_url(url: str, mirror: str | None) -> str:
    """``url``, or with ``--mirror BASE`` the same file name under ``BASE`` (a mirror is a
    flat directory of the official files under their official names)."""
    if not mirror:
        return url
    return mirror.rstrip("/") + "/" + Remote(url).filename


def _fetch_once(url: str, part: Path, timeout: float, show_progress: bool) -> None:
    pos = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if pos:
        headers["Range"] = f"bytes={pos}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
        if pos and (resp.status != 206 or not resp.headers.get("Content-Range", "").startswith(f"bytes {pos}-")):
            pos = 0  # the server ignored our Range request: start again from byte 0
        length = resp.headers.get("Content-Length")
        total = pos + int(length) if length and length.isdigit() else None
        with open(part, "ab" if pos else "wb") as f, \
                tqdm(total=total, initial=pos, unit="B", unit_scale=True, desc=part.name[:-5],
                     disable=not show_progress) as bar:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size < total:
        raise http.client.IncompleteRead(b"", total - part.stat().st_size)


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _mismatch(path: Path, md5: str | None, sha256: str | None, size: int | None) -> str | None:
    """Why ``path`` is not the published file (``None`` when it matches, or nothing is published)."""
    if size is not None and path.stat().st_size != size:
        return f"size {path.stat().st_size} bytes, expected {size}"
    for algo, expected in (("md5", md5), ("sha256", sha256)):
        if expected and (got := _digest(path, algo)) != expected.lower():
            return f"{algo} checksum mismatch (expected {expected}, got {got})"
    return None


def fetch(url: str, dest, md5: str | None = None, sha256: str | None = None, retries: int = 3,
          timeout: float = 60, show_progress: bool = True, size: int | None = None) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``) and verify its size and checksums.

    An existing ``dest`` is verified first and downloaded again when it fails. Raises
    :class:`DataPrepError` on an HTTP error status, on a size or checksum mismatch of the
    download (the bad file is deleted) or when the connection keeps failing (the partial file
    is kept).
    """
    dest = Path(dest)
    if dest.exists():
        problem = _mismatch(dest, md5, sha256, size)
        if problem is None:
            return dest
        print(f"data_prep: {dest}: {problem}; deleting it and downloading it again", file=sys.stderr)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout, show_progress)
            break
        except urllib.error.HTTPError as err:
            if err.code == 416 and part.exists():
                break  # "range not satisfiable": the partial file already holds everything
            if err.code < 500:
                raise DataPrepError(f"download failed: {url}: HTTP {err.code} {err.reason}") from None
            last = f"HTTP {err.code} {err.reason}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            last = str(getattr(err, "reason", None) or err) or type(err).__name__
        if attempt == retries:
            kept = part.stat().st_size if part.exists() else 0
            raise DataPrepError(f"download failed: {url}: {last} ({retries + 1} attempts); "
                                f"{kept} bytes kept in {part}, re-run to resume")
        time.sleep(min(0.5 * 2 ** attempt, 10))
    problem = _mismatch(part, md5, sha256, size)
    if problem is not None:
        part.unlink()
        raise DataPrepError(f"{dest.name}: {problem} for {url}; the file was deleted, re-run to download it again")
    os.replace(part, dest)
    return dest


def extract(archive: Path, dest_dir: Path) -> None:
    """Unpack a zip or tar archive into ``dest_dir`` once (a marker file records it)."""
    marker = dest_dir / f".extracted-{archive.name}"
    if marker.exists():
        return
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(dest_dir)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                safe_extract_tar(t, dest_dir, archive)
        else:
            raise DataPrepError(f"{archive}: expected a zip or tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        raise DataPrepError(f"{archive}: damaged archive ({err}); delete it and re-run") from None
    marker.write_text("")


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def safe_extract_tar(tar: tarfile.TarFile, dest_dir: Path, archive: Path) -> None:
    """``tar.extractall`` that refuses absolute or ``..`` members, links pointing outside
    ``dest_dir`` and device files, on every Python: ``extractall(filter="data")`` does the same
    but exists only from Python 3.10.12 / 3.11.4, below the ``requires-python`` floor."""
    root = os.path.realpath(dest_dir)
    members = tar.getmembers()
    for m in members:
        target = os.path.join(root, m.name)
        if os.path.isabs(m.name) or ".." in Path(m.name).parts or not _inside(root, target):
            raise DataPrepError(f"{archive}: member {m.name!r} would be written outside {dest_dir}; not extracting")
        if m.issym() or m.islnk():
            base = os.path.dirname(target) if m.issym() else root
            if os.path.isabs(m.linkname) or not _inside(root, os.path.join(base, m.linkname)):
                raise DataPrepError(f"{archive}: link {m.name!r} -> {m.linkname!r} points outside {dest_dir}; "
                                    "not extracting")
        elif not (m.isfile() or m.isdir()):
            raise DataPrepError(f"{archive}: member {m.name!r} is a device or fifo; not extracting")
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest_dir, members=members, filter="data")
        return
    for m in members:  # what the data filter also does: no setuid/sticky or group/other write, our owner
        m.mode &= 0o755
        m.uid, m.gid, m.uname, m.gname = os.getuid(), os.getgid(), "", ""
    tar.extractall(dest_dir, members=members)


def fetch_all(remotes, cache_dir, mirror: str | None = None, show_progress: bool = True) -> Path:
    """Download (and unpack) ``remotes`` into ``cache_dir``; return ``cache_dir``."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for remote in remotes:
        path = fetch(resolve_url(remote.url, mirror), cache_dir / remote.filename, md5=remote.md5,
                     sha256=remote.sha256, show_progress=show_progress, size=remote.size)
        if remote.extract:
            extract(path, cache_dir)
    return cache_dir


def add_arguments(parser) -> None:
    """``--download``, ``--mirror`` and ``--cache-dir``."""
    parser.add_argument("--download", action="store_true",
                        help="download the official files first (resumable); inputs not given default "
                             "to the downloaded ones")
    parser.add_argument("--mirror", metavar="URL",
                        help="fetch the official files from URL/FILENAME instead of their official hosts")
    parser.add_argument("--cache-dir", metavar="DIR", help="where downloads go (default: OUT/_downloads)")


def cache_dir_of(args) -> Path:
    return Path(args.cache_dir) if args.cache_dir else Path(args.out) / "_downloads"
