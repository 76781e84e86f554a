"""``manifest.json`` and open_clip's ``sizes.json``, rebuilt from the per-shard records."""
import json
import os
import uuid
from collections import Counter
from pathlib import Path

MANIFEST = "manifest.json"
SIZES = "sizes.json"
MAX_EXAMPLES = 5  # per reason and prefix
# the sample layout of each task (README, Downstream): what the manifest says the shards hold
SCHEMAS = {
    "caption": {"jpg": "image", "txt": "caption", "json": "source, image_id, original_size, captions"},
    "vqa": {"jpg": "image", "txt": "question", "json": "task, dataset, question_id, question, answers, "
                                                       "answer_type, question_type, image_id"},
    "nlvr2": {"left.jpg": "left image", "right.jpg": "right image", "txt": "sentence",
              "json": "task, label, identifier, sentence"},
    "snli_ve": {"jpg": "image (premise)", "txt": "hypothesis", "json": "task, label, label_id, hypothesis, image_id"},
}


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a record being replaced right now, or damaged: treated as missing


def collect(out_dir) -> dict:
    """Summarise everything under ``out_dir/_progress``, complete or not.

    Returns ``{"num_samples", "num_shards", "shards": [{"name", "num_samples", "prefix",
    "source"}], "sources": {prefix: {...counts, failures, examples, complete}}}``. Only
    prefixes whose every shard is written contribute shards, so a loader reading the
    manifest never sees a half-made dataset. Downstream sets add ``task`` (``vqa``, ``nlvr2``,
    ``snli_ve``, ``caption``) and ``chance`` (share of the most frequent answer or label) to
    their source entry; the synthetic ones also ``text_only`` (:mod:`data_prep.synthetic_tasks`).
    """
    out_dir = Path(out_dir)
    sources: dict[str, dict] = {}
    shards: list[dict] = []
    for run_file in sorted((out_dir / "_progress").glob("*/run.json")):
        run = _load(run_file)
        if not run:
            continue
        prefix = run_file.parent.name
        records = []
        for i in range(run["num_shards"]):
            rec = _load(run_file.parent / f"{i:06d}.json")
            if rec and (out_dir / rec["shard"]).exists():
                records.append(rec)
        failures = Counter(run.get("parse_failures", {}))
        examples = {k: list(v) for k, v in run.get("parse_examples", {}).items()}
        for rec in records:
            failures.update(rec["failures"])
            for reason, ex in rec["examples"].items():
                kept = examples.setdefault(reason, [])
                kept.extend(ex[:MAX_EXAMPLES - len(kept)])
        complete = len(records) == run["num_shards"]
        num_samples = sum(r["num_samples"] for r in records)
        sources[prefix] = {
            "source": run["source"], "split": run.get("split"), "eval": bool(run.get("eval")),
            "complete": complete, "num_rows": run["num_rows"] + sum(run.get("parse_failures", {}).values()),
            "num_samples": num_samples, "num_failed": sum(failures.values()),
            "num_shards": run["num_shards"], "shards_done": len(records), "shard_size": run["shard_size"],
            "pattern": f"{prefix}-{{{0:06d}..{max(run['num_shards'] - 1, 0):06d}}}.tar",
            "failures": dict(failures.most_common()), "examples": examples,
        }
        # downstream sets: which task's schema the samples follow, and its chance level
        sources[prefix].update({k: run[k] for k in ("task", "chance", "text_only") if k in run})
        if complete:
            shards += [{"name": r["shard"], "num_samples": r["num_samples"], "prefix": prefix,
                        "source": run["source"]} for r in records]
    tasks = sorted({src.get("task") or "caption" for src in sources.values()}) or ["caption"]
    schema = SCHEMAS[tasks[0]] if len(tasks) == 1 else {t: SCHEMAS[t] for t in tasks}
    return {"format": "webdataset", "schema": schema,
            "num_samples": sum(s["num_samples"] for s in shards), "num_shards": len(shards),
            "shards": shards, "sources": sources}


def write(out_dir) -> dict:
    """Rewrite ``manifest.json`` and ``sizes.json`` in ``out_dir``; return the manifest."""
    out_dir = Path(out_dir)
    data = collect(out_dir)
    for name, obj in ((MANIFEST, data), (SIZES, {s["name"]: s["num_samples"] for s in data["shards"]})):
        tmp = out_dir / f".{name}.tmp{uuid.uuid4().hex[:12]}"  # unique across the nodes of a job array
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, out_dir / name)
    return data
