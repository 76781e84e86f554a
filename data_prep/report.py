"""``python -m data_prep report DIR``: sample counts, failures by reason, top errors, and the
shard files checked against ``manifest.json``."""
import json
import tarfile
from collections import Counter
from pathlib import Path

from . import manifest
from .errors import DataPrepError

END_OF_ARCHIVE = 1024  # two 512-byte zero blocks close every tar archive


def render(out_dir, top: int = 5) -> str:
    """The report for ``out_dir`` as text (also for incomplete, still resumable runs)."""
    out_dir = Path(out_dir)
    if not (out_dir / "_progress").is_dir():
        raise DataPrepError(f"{out_dir}: not a data_prep output directory (no _progress/ inside)")
    data = manifest.collect(out_dir)
    lines = [f"{out_dir}: {data['num_samples']} samples in {data['num_shards']} shards "
             f"from {len(data['sources'])} source run(s)"]
    totals: Counter = Counter()
    for prefix, s in sorted(data["sources"].items()):
        state = "complete" if s["complete"] else f"INCOMPLETE ({s['shards_done']}/{s['num_shards']} shards; re-run to resume)"
        kind = "eval" if s["eval"] else "train"
        ok = 100.0 * s["num_samples"] / s["num_rows"] if s["num_rows"] else 0.0
        lines.append(f"  {prefix:<16} {s['source']:<10} {kind:<5} rows {s['num_rows']:>9}  samples {s['num_samples']:>9} "
                     f"({ok:.1f}%)  shards {s['num_shards']:>5}  {state}")
        if s["failures"]:
            lines.append("      failed: " + ", ".join(f"{r} {n}" for r, n in s["failures"].items()))
        totals.update({(prefix, r): n for r, n in s["failures"].items()})
    if totals:
        lines.append(f"top errors:")
        for (prefix, reason), n in totals.most_common(top):
            example = (data["sources"][prefix]["examples"].get(reason) or [""])[0]
            lines.append(f"  {n:>7}  {prefix}: {reason:<14} e.g. {example}")
    else:
        lines.append("no failed rows")
    return "\n".join(lines + shard_check(out_dir))


def _complete_samples(path: Path) -> int:
    """Samples of a cut tar that can still be read whole: those with as many files as the first."""
    keys: list[str] = []  # the sample key of each file read whole
    try:
        with tarfile.open(path, "r|") as tf:
            for member in tf:
                keys.append(member.name.split(".", 1)[0])
    except (tarfile.TarError, OSError):
        keys = keys[:-1]  # the error came while reading the last file's data
    files = Counter(keys)
    return sum(1 for n in files.values() if keys and n >= files[keys[0]])


def shard_check(out_dir: Path) -> list[str]:
    """``manifest.json`` against the shard files: a missing shard, or one cut short (no tar
    end-of-archive marker: tar readers take a cut at a header for the end), by name with the
    samples it lacks."""
    path = out_dir / manifest.MANIFEST
    if not path.exists():
        return [f"no {manifest.MANIFEST}: shards not checked"]
    try:
        listed = json.loads(path.read_text())
        listed["shards"] = [dict(name=str(s["name"]), num_samples=int(s["num_samples"])) for s in listed["shards"]]
    except (ValueError, KeyError, TypeError) as exn:
        raise DataPrepError(f"{path}: not a data_prep manifest ({exn!r})") from None
    problems, lacking = [], 0
    for shard in listed["shards"]:
        path, want = out_dir / shard["name"], int(shard["num_samples"])
        if not path.exists():
            problems.append(f"  MISSING {shard['name']}: its {want} samples are listed in manifest.json")
            lacking += want
            continue
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - END_OF_ARCHIVE))
            tail = f.read()
        if len(tail) == END_OF_ARCHIVE and tail.count(0) == END_OF_ARCHIVE:
            continue
        have = _complete_samples(path)
        problems.append(f"  CUT {shard['name']}: {have} of {want} samples readable "
                        "(no end-of-archive marker); re-run data_prep to rewrite it")
        lacking += want - have
    if not problems:
        return [f"shards: all {len(listed['shards'])} in manifest.json present and intact"]
    return [f"shards: {len(problems)} of {len(listed['shards'])} in manifest.json missing or cut short, "
            f"{lacking} samples lacking"] + problems


def add_arguments(parser) -> None:
    parser.add_argument("dir", help="an output directory of data_prep")
    parser.add_argument("--top", type=int, default=5, help="how many error kinds to show (default 5)")


def run(args) -> None:
    print(render(args.dir, args.top))
