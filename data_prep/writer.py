"""Resumable shard writing shared by all sources.

How resume works: a source turns its inputs into a deterministic list of rows; shard ``i``
holds rows ``[i*S, (i+1)*S)``. Each shard is written with webdataset's ``ShardWriter`` to a
hidden ``.PREFIX-NNNNNN.tar.partial`` file, renamed atomically to ``PREFIX-NNNNNN.tar`` when
complete, and then recorded in ``_progress/PREFIX/NNNNNN.json`` (sample count, failures).
A shard counts as done only when both its tar and its record exist, so a re-run after a
kill skips done shards, deletes stale partial files and rewrites the rest: the final
sample set equals that of an uninterrupted run. ``_progress/PREFIX/run.json`` holds a
fingerprint of the options that shape the output, so a re-run with different options is
refused instead of silently mixing two datasets.
"""
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from tqdm import tqdm

from . import manifest
from .errors import DataPrepError
from .reasons import Skip

PROGRESS_DIR = "_progress"
MAX_EXAMPLES = 3  # per reason and shard: enough to diagnose, small enough for the manifest
# Test hook: seconds to sleep per row, so a test can kill a run half-way through.
SLEEP_ENV = "DATA_PREP_TEST_SLEEP"
# no "-": it separates prefix and shard number, so "coco" can never match "coco-x" files
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_]+$")


def shard_name(prefix: str, index: int) -> str:
    """File name of shard ``index`` of ``prefix``."""
    return f"{prefix}-{index:06d}.tar"


def sample_key(prefix: str, row: int) -> str:
    """Sample key of input row ``row``: unique across prefixes, no dots (webdataset splits on them)."""
    return f"{prefix}-{row:09d}"


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to ``path`` through a temporary file and a rename, so readers and
    resumed runs never see half a file."""
    # a random name, not the pid: the tasks of a job array on other nodes may share a pid
    tmp = path.with_name(f".{path.name}.tmp{uuid.uuid4().hex[:12]}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def encode_sample(key: str, sample: dict) -> dict:
    """Turn ``{"jpg": bytes, "txt": str, "json": dict}`` into the bytes webdataset stores."""
    out = {"__key__": key}
    for ext, value in sample.items():
        if isinstance(value, bytes):
            out[ext] = value
        elif isinstance(value, str):
            out[ext] = value.encode("utf-8")
        else:
            out[ext] = json.dumps(value, sort_keys=True).encode("utf-8")
    return out


class Part(NamedTuple):
    """Task ``index`` of ``count`` tasks sharing one dataset (``--part I/N``, e.g. a SLURM job
    array): it writes shards ``index, index + count, index + 2 * count, ...`` and no other, so
    the tasks together write every shard exactly once. ``Part()`` is the whole dataset."""
    index: int = 0
    count: int = 1

    @property
    def whole(self) -> bool:
        return self.count == 1

    def shards(self, num_shards: int) -> list[int]:
        """This task's shard indices among ``num_shards``."""
        return list(range(self.index, num_shards, self.count))

    def check(self, overwrite: bool) -> None:
        if not 0 <= self.index < self.count:
            raise DataPrepError(f"--part {self.index}/{self.count}: the task index must be 0..{self.count - 1}")
        if overwrite and not self.whole:
            raise DataPrepError("--overwrite cannot be combined with --part: each task would delete the "
                                "others' shards; rebuild with --overwrite in one run, or use a new --out")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class Progress:
    """The ``_progress/PREFIX`` directory of one output prefix."""

    def __init__(self, out_dir: Path, prefix: str):
        if not _PREFIX_RE.match(prefix):
            raise DataPrepError(f"--prefix {prefix!r}: use letters, digits and '_' only")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.dir = self.out_dir / PROGRESS_DIR / prefix
        self.run_file = self.dir / "run.json"

    def record_path(self, index: int) -> Path:
        return self.dir / f"{index:06d}.json"

    def is_done(self, index: int) -> bool:
        return self.record_path(index).exists() and (self.out_dir / shard_name(self.prefix, index)).exists()

    def clear(self) -> None:
        """Delete this prefix's shards and progress (``--overwrite``)."""
        for p in self.out_dir.glob(f"{self.prefix}-{'[0-9]' * 6}.tar"):
            p.unlink()
        shutil.rmtree(self.dir, ignore_errors=True)

    def all_done(self, num_shards: int) -> bool:
        return all(self.is_done(i) for i in range(num_shards))

    def begin(self, fingerprint: dict, plan: dict, overwrite: bool = False, shards: Sequence[int] | None = None) -> None:
        """Start or resume a run. ``fingerprint``: the options that shape the output;
        ``plan``: num_rows, num_shards, shard_size, source, parse failures and the like;
        ``shards``: the shards this task writes (default all), whose stale partial files it deletes."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self.clear()
        elif self.run_file.exists():
            try:
                old = json.loads(self.run_file.read_text())["fingerprint"]
            except (ValueError, KeyError):
                old = None  # a damaged run file: the shards cannot be trusted either
            if old != fingerprint:
                raise DataPrepError(_mismatch_message(self.out_dir, self.prefix, old, fingerprint))
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.out_dir.glob(f".{self.prefix}-*.tar.partial"):
            # left by a killed run; its shard is rewritten below. Another task's shard may be
            # being written right now: leave it alone.
            index = stale.name[len(self.prefix) + 2:-len(".tar.partial")]
            if shards is None or (index.isdigit() and int(index) in shards):
                stale.unlink(missing_ok=True)
        write_json_atomic(self.run_file, {"fingerprint": fingerprint, "complete": False, **plan})

    def finish(self) -> None:
        run = json.loads(self.run_file.read_text())
        run["complete"] = all(self.is_done(i) for i in range(run["num_shards"]))
        run["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json_atomic(self.run_file, run)


def _mismatch_message(out_dir, prefix, old, new) -> str:
    if not isinstance(old, dict):
        diff = "an unreadable run record"
    else:
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        diff = ", ".join(f"{k}={old.get(k)!r} (now {new.get(k)!r})" for k in keys[:4])
    return (f"{out_dir} already holds '{prefix}' shards made with different options: {diff}; "
            "re-run the original command to resume it, pass --overwrite to rebuild, "
            "or choose another --out or --prefix")


def write_shard(out_dir: Path, prefix: str, index: int, start: int, rows: Sequence,
                make_sample: Callable, on_row: Callable | None = None) -> dict:
    """Write shard ``index`` from ``rows`` (input rows ``start..``) and record it.

    ``make_sample(row_index, row)`` returns ``{"jpg", "txt", "json"}`` or raises
    :class:`Skip`, which is counted by reason. Returns the shard record.
    """
    # Imported here, not at module level: webdataset 0.2 imports torch when it is installed,
    # and --help, report and input validation should stay instant.
    import webdataset as wds

    out_dir = Path(out_dir)
    final = out_dir / shard_name(prefix, index)
    failures: Counter = Counter()
    examples: dict[str, list[str]] = {}
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
    # One ShardWriter per shard: it never splits (no count/size limit) and its post hook
    # does the atomic rename; the shard boundaries come from the row order instead, which
    # is what makes a resumed run reproduce exactly the same shards.
    sink = wds.ShardWriter(str(out_dir / f".{prefix}-%06d.tar.partial"), maxcount=len(rows) + 1,
                           maxsize=float("inf"), start_shard=index, verbose=0,
                           post=lambda tmp: os.replace(tmp, final),
                           # whole seconds: a float mtime adds a pax header to every member,
                           # which doubles the per-file cost of reading the shard
                           mtime=int(time.time()))
    written = 0
    for offset, row in enumerate(rows):
        if sleep:
            time.sleep(sleep)
        row_index = start + offset
        try:
            sample = make_sample(row_index, row)
        except Skip as skip:
            failures[skip.reason] += 1
            ex = examples.setdefault(skip.reason, [])
            if len(ex) < MAX_EXAMPLES:
                ex.append(f"row {row_index}: {skip.detail}"[:300])
        else:
            sink.write(encode_sample(sample_key(prefix, row_index), sample))
            written += 1
        if on_row is not None:
            on_row()
    sink.close()  # only reached on success: an exception leaves the .partial for cleanup
    record = {"shard": final.name, "index": index, "num_samples": written,
              "rows": [start, start + len(rows)], "failures": dict(failures), "examples": examples}
    write_json_atomic(Progress(out_dir, prefix).record_path(index), record)
    return record


def warn_few_shards(prefix: str, num_shards: int, min_shards: int, shard_size: int) -> None:
    """Warn when fewer shards exist than data-loader readers are likely to want."""
    if num_shards == 0:
        print(f"warning: {prefix}: no usable rows in the input (see the failure counts)", file=sys.stderr)
    elif num_shards < min_shards:
        print(f"warning: {prefix}: {num_shards} shard(s) but a typical job reads with {min_shards} "
              f"workers (nodes x GPUs x loader workers, --min-shards); some would get no shard. "
              f"Lower --shard-size (now {shard_size}) to about "
              f"{max(1, math.ceil(num_shards * shard_size / min_shards))}.", file=sys.stderr)


def finish_part(progress: Progress, part: Part, num_shards: int) -> dict:
    """After a task wrote its shards: the run record and manifest when every shard of the
    dataset is done, else only a note. Of tasks finishing at once, the last one to write a
    shard record always sees them all, so exactly the final state is written (no task writes
    a manifest from an older view). Returns the manifest (written or not)."""
    if part.whole or progress.all_done(num_shards):
        progress.finish()
        return manifest.write(progress.out_dir)
    done = sum(progress.is_done(i) for i in range(num_shards))
    print(f"{progress.prefix}: part {part} done ({len(part.shards(num_shards))} of {num_shards} shards); "
          f"{done}/{num_shards} written so far; the last part to finish writes manifest.json", file=sys.stderr)
    return manifest.collect(progress.out_dir)


def write_dataset(out_dir, prefix: str, source: str, rows: Sequence, make_sample: Callable, *,
                  shard_size: int, fingerprint: dict, parse_failures: dict | None = None,
                  parse_examples: dict | None = None, extra: dict | None = None, workers: int = 1,
                  overwrite: bool = False, min_shards: int = 64, show_progress: bool = True,
                  part: Part = Part()) -> dict:
    """Write (or finish writing) ``rows`` as shards of ``shard_size`` under ``out_dir``.

    ``make_sample`` must be picklable when ``workers > 1`` (shards are then written in
    parallel processes). ``part``: write only this task's shards (see :class:`Part`).
    Rewrites ``manifest.json`` / ``sizes.json`` once every shard exists and returns the manifest.
    """
    out_dir = Path(out_dir)
    if shard_size < 1:
        raise DataPrepError(f"--shard-size must be at least 1, got {shard_size}")
    part.check(overwrite)
    num_shards = math.ceil(len(rows) / shard_size)
    mine = part.shards(num_shards)
    progress = Progress(out_dir, prefix)
    plan = {"source": source, "num_rows": len(rows), "num_shards": num_shards, "shard_size": shard_size,
            "parse_failures": dict(parse_failures or {}), "parse_examples": dict(parse_examples or {}),
            **(extra or {})}
    progress.begin({**fingerprint, "source": source, "num_rows": len(rows), "shard_size": shard_size},
                   plan, overwrite, shards=None if part.whole else mine)
    warn_few_shards(prefix, num_shards, min_shards, shard_size)
    todo = [i for i in mine if not progress.is_done(i)]
    size = {i: len(rows[i * shard_size:(i + 1) * shard_size]) for i in mine}
    total = sum(size.values())
    with tqdm(total=total, initial=total - sum(size[i] for i in todo), desc=prefix, unit="img",
              disable=not show_progress, dynamic_ncols=True) as bar:
        if workers <= 1 or len(todo) <= 1:
            for i in todo:
                write_shard(out_dir, prefix, i, i * shard_size, rows[i * shard_size:(i + 1) * shard_size],
                            make_sample, on_row=lambda: bar.update(1))
        else:
            # spawn, not fork: the caller may hold threads (tqdm's monitor, a trainer's pools).
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(write_shard, out_dir, prefix, i, i * shard_size,
                                       list(rows[i * shard_size:(i + 1) * shard_size]), make_sample): i
                           for i in todo}
                for fut in as_completed(futures):
                    bar.update(fut.result()["rows"][1] - fut.result()["rows"][0])
    return finish_part(progress, part, num_shards)
