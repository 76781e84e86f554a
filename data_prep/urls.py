"""Sources given as image URLs (SBU, CC3M), downloaded with img2dataset used as a library.

img2dataset downloads, validates and resizes into its own shards under
``OUT/_img2dataset/PREFIX`` (shard ``i`` = URL rows ``[i*S, (i+1)*S)``, resumed with its
``incremental`` mode, which skips shards that have a ``_stats.json``). Each finished
img2dataset shard is then rewritten into our schema and naming (``PREFIX-NNNNNN.tar``,
samples in row order) through the same resumable writer the local sources use, and its
per-row errors (from img2dataset's per-shard parquet) are counted by reason. The staging
files of a shard are deleted once it is converted, so a dataset needs little extra disk.
"""
import json
import math
import os
import shutil
import tarfile
import threading
from pathlib import Path
from typing import NamedTuple

from . import writer
from .annotations import EVAL_SPLITS, Parsed, require_file
from .captions import clean_captions
from .errors import DataPrepError
from .reasons import BAD_ROW, EMPTY_CAPTION, OTHER, Skip, classify_download_error

STAGE_DIR = "_img2dataset"
OOM_SHARD_COUNT = 5  # as in i2d.py (not imported here: it loads img2dataset)


class UrlRow(NamedTuple):
    """One URL row: the image URL, its captions (cleaned, non-empty), an image id, and further
    ``KEY.json`` fields as a JSON object string (NoCaps' domain, ...)."""
    url: str
    captions: tuple
    image_id: str
    extra: str = "{}"


def add_arguments(parser) -> None:
    """img2dataset's knobs: processes, threads, timeout, retries."""
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="img2dataset download processes (default: CPU count)")
    parser.add_argument("--threads", type=int, default=64, help="download threads per process (default 64)")
    parser.add_argument("--timeout", type=int, default=10, help="seconds per image request (default 10)")
    parser.add_argument("--retries", type=int, default=0, help="retries per failed image (default 0)")


def _stats(stage: Path, index: int) -> Path:
    return stage / f"{index:0{OOM_SHARD_COUNT}d}_stats.json"


class _Converter:
    """Runs ``convert`` every few seconds in a thread while the ``with`` body runs."""

    def __init__(self, convert, interval: float = 1.0):
        self.convert, self.interval = convert, interval
        self.stop = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._loop, name="shard-converter", daemon=True)

    def _loop(self):
        while not self.stop.wait(self.interval):
            try:
                self.convert()
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                self.error = err
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error
        return False


def _write_input(rows: list, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"url": [r.url for r in rows], "caption": [r.captions[0] for r in rows],
                      "captions": [list(r.captions) for r in rows], "image_id": [str(r.image_id) for r in rows],
                      "extra": [r.extra for r in rows]})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _read_stage_tar(path: Path) -> dict:
    """``{key: {ext: bytes}}`` of an img2dataset webdataset shard."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _convert_shard(out_dir: Path, stage: Path, prefix: str, source: str, split: str, index: int,
                   shard_size: int, count: int) -> None:
    """Rewrite img2dataset shard ``index`` (``count`` rows) as our shard ``index``."""
    import pyarrow.parquet as pq
    name = f"{index:0{OOM_SHARD_COUNT}d}"
    files = _read_stage_tar(stage / f"{name}.tar") if (stage / f"{name}.tar").exists() else {}
    meta = pq.read_table(stage / f"{name}.parquet").to_pylist() if (stage / f"{name}.parquet").exists() else []
    per_shard = 10 ** math.ceil(math.log10(shard_size)) if shard_size > 1 else 1
    results: list = [None] * count
    for m in meta:
        pos = int(m["key"]) % per_shard  # img2dataset's key: shard * 10**ceil(log10(S)) + position
        if pos < count:
            results[pos] = m

    def make_sample(row_index, m):
        if m is None:
            raise Skip(OTHER, "img2dataset returned no result for this row")
        sample = files.get(m["key"])
        if m["status"] != "success" or not sample or "jpg" not in sample:
            err = m.get("error_message") or m["status"] or "unknown error"
            raise Skip(classify_download_error(err), f"{m['url']}: {err}")
        return {"jpg": sample["jpg"], "txt": m["caption"],
                "json": {**json.loads(m.get("extra") or "{}"),
                         "source": source, "image_id": m["image_id"], "url": m["url"], "split": split,
                         "original_size": [m["original_width"], m["original_height"]],
                         "size": [m["width"], m["height"]], "captions": list(m.get("captions") or [m["caption"]])}}

    writer.write_shard(out_dir, prefix, index, index * shard_size, results, make_sample)
    for suffix in (".tar", ".parquet"):
        (stage / f"{name}{suffix}").unlink(missing_ok=True)


def build(args, source: str, parsed: Parsed, split: str, input_files: list, task: str | None = None) -> dict:
    """Download ``parsed`` URL rows with img2dataset and shard them under ``args.out``;
    ``task``: recorded in the manifest for downstream sets (``caption`` for NoCaps)."""
    out_dir = Path(args.out)
    rows, shard_size = parsed.rows, args.shard_size
    if shard_size < 1:
        raise DataPrepError(f"--shard-size must be at least 1, got {shard_size}")
    part = args.part
    part.check(args.overwrite)
    is_eval = split in EVAL_SPLITS
    prefix = args.prefix or (source if split == "train" else f"{source}_{split}")
    num_shards = math.ceil(len(rows) / shard_size)
    mine = part.shards(num_shards)
    resize_mode = args.resize_mode if args.image_size > 0 else "no"
    progress = writer.Progress(out_dir, prefix)
    fingerprint = {"inputs": [[str(Path(p).resolve()), Path(p).stat().st_size] for p in input_files],
                   "split": split, "max_words": args.max_words, "image_size": args.image_size,
                   "resize_mode": resize_mode, "min_image_size": args.min_image_size,
                   "source": source, "num_rows": len(rows), "shard_size": shard_size}
    plan = {"source": source, "num_rows": len(rows), "num_shards": num_shards, "shard_size": shard_size,
            "parse_failures": dict(parsed.failures), "parse_examples": parsed.examples,
            "split": split, "eval": is_eval, **({"task": task} if task else {})}
    progress.begin(fingerprint, plan, args.overwrite, shards=None if part.whole else mine)
    # one staging folder per task of a --part split: each marks the others' shards as done there
    stage = out_dir / STAGE_DIR / (prefix if part.whole else f"{prefix}_part{part.index}of{part.count}")
    if args.overwrite:
        shutil.rmtree(stage, ignore_errors=True)  # img2dataset's files of the old run
    writer.warn_few_shards(prefix, num_shards, args.min_shards, shard_size)
    todo = [i for i in mine if not progress.is_done(i)]
    if todo:
        stage.mkdir(parents=True, exist_ok=True)
        for i in range(num_shards):
            if i not in todo and not _stats(stage, i).exists():
                _stats(stage, i).write_text("{}")  # already converted: img2dataset must not fetch it again

        def convert_ready():
            # a _stats.json is written after the shard's tar and parquet are closed
            for i in todo:
                if not progress.is_done(i) and _stats(stage, i).exists():
                    count = min(shard_size, len(rows) - i * shard_size)
                    _convert_shard(out_dir, stage, prefix, source, split, i, shard_size, count)

        if any(not _stats(stage, i).exists() for i in todo):
            url_list = stage.parent / f"{stage.name}.parquet"
            _write_input(rows, url_list)
            options = dict(
                image_size=max(args.image_size, 1), resize_mode=resize_mode, resize_only_if_bigger=True,
                skip_reencode=resize_mode == "no", min_image_size=args.min_image_size,
                processes_count=args.processes, thread_count=args.threads, number_sample_per_shard=shard_size,
                timeout=args.timeout, retries=args.retries)
            # Convert shards while img2dataset works on the next ones: finished shards are
            # safe from a kill sooner, and staging never holds the whole dataset twice.
            from .i2d import run_img2dataset  # imports img2dataset: only when downloading
            with _Converter(convert_ready):
                run_img2dataset(url_list, stage, options)
        convert_ready()
    missing = sum(not progress.is_done(i) for i in mine)
    if not missing:
        shutil.rmtree(stage, ignore_errors=True)
        (out_dir / STAGE_DIR / f"{stage.name}.parquet").unlink(missing_ok=True)
        try:
            (out_dir / STAGE_DIR).rmdir()  # only if no other prefix or task is still staging there
        except OSError:
            pass
    result = writer.finish_part(progress, part, num_shards)
    if missing:
        raise DataPrepError(f"{prefix}: img2dataset left {missing} shard(s) unfinished (see its messages "
                            "above); re-run the same command to retry them", exit_code=1)
    return result


def add_row(parsed: Parsed, where: str, url, captions, image_id, max_words: int, extra: dict | None = None) -> None:
    """Append a :class:`UrlRow` to ``parsed``, or count why the row is unusable. ``extra``:
    further ``KEY.json`` fields."""
    if not isinstance(url, str) or not url.strip().lower().startswith(("http://", "https://")):
        parsed.fail(BAD_ROW, f"{where}: not an http(s) URL: {str(url)[:100]!r}")
        return
    caps = clean_captions(captions, max_words)
    if not caps:
        parsed.fail(EMPTY_CAPTION, f"{where}: {url.strip()}")
        return
    parsed.rows.append(UrlRow(url.strip(), tuple(caps), str(image_id), json.dumps(extra or {}, sort_keys=True)))


def read_lines(path, what: str) -> list[str]:
    """Lines of a text file without their line ends; a missing file is a clear error."""
    with open(require_file(path, what), encoding="utf-8", errors="replace", newline="") as f:
        return f.read().splitlines()
