"""Checkpoints that are never picked up half-written, and the state that makes resume exact.

Layout under ``RUN_DIR/checkpoints``::

    step00001200/            one DeepSpeed tag (model, optimizer partitions, LR scheduler,
        ...                  client state: step, samples seen)
        trainer_rank00000.pt per-rank state: RNG (python, numpy, torch, cuda) and data position
        meta.json            written last, by rank 0, after every rank has finished: the marker
    latest                   tag of the newest complete checkpoint (written after meta.json)

Only tags with ``meta.json`` are resumed from; a crash in the middle of a save leaves a tag
without it, which is ignored (and pruned later). Finding checkpoints and reading their module
weights back (evaluation, ``train.init_from``) is :mod:`pipeline.models.weights`.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.files import atomic_write_text
from pipeline.models.weights import LATEST, MARKER, complete_tags, find_checkpoint, find_latest, is_complete, read_meta

log = logging.getLogger(__name__)


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """``train.resume`` -> a complete tag directory, or None for a fresh start."""
    if resume == "none":
        return None
    if resume == "latest":
        return find_latest(run_dir / "checkpoints")
    try:
        return find_checkpoint(resume)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"train.resume: {err}") from None


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save / load


def rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"trainer_rank{rank:05d}.pt"


def save(engine, ckpt_dir: Path, step: int, *, client_state: dict, rank_state: dict, rank: int,
         world_size: int, exclude_frozen: bool, keep: int, barrier) -> Path:
    """Collective: every rank calls it. Returns the tag directory."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (tag_dir / MARKER).unlink(missing_ok=True)  # re-saving a step: it is incomplete until done
    barrier()
    t0 = time.time()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=exclude_frozen)
    torch.save(rank_state, rank_file(tag_dir, rank))
    barrier()  # every rank's files are on disk
    if rank == 0:
        meta = {"step": step, "world_size": world_size, "time": time.time(),
                **{k: v for k, v in client_state.items() if isinstance(v, (int, float, str, bool))}}
        atomic_write_text(tag_dir / MARKER, json.dumps(meta, indent=1))
        atomic_write_text(ckpt_dir / LATEST, tag)
        prune(ckpt_dir, keep, protect=tag_dir)
        log.info("checkpoint %s written in %.1fs", tag_dir, time.time() - t0)
    barrier()
    return tag_dir


def prune(ckpt_dir: Path, keep: int, protect: Path) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop incomplete ones older than the newest."""
    complete = complete_tags(ckpt_dir)
    doomed = complete[:-keep] if keep > 0 else []
    newest = read_meta(complete[-1])["step"] if complete else None
    for d in ckpt_dir.iterdir():
        if d.is_dir() and not is_complete(d) and d.name.startswith("step") and newest is not None:
            try:
                if int(d.name[4:]) < newest:
                    doomed.append(d)
            except ValueError:
                pass
    for d in doomed:
        if d.resolve() != protect.resolve():
            shutil.rmtree(d, ignore_errors=True)


def load(engine, tag_dir: Path, *, rank: int, exclude_frozen: bool) -> tuple[dict, dict | None]:
    """Restore engine (model, optimizer, scheduler) from ``tag_dir``; returns (client_state,
    this rank's trainer state or None when the checkpoint has no file for this rank)."""
    load_path, client_state = engine.load_checkpoint(
        str(tag_dir.parent), tag=tag_dir.name, load_module_strict=not exclude_frozen,
        load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    f = rank_file(tag_dir, rank)
    rank_state: Any = torch.load(f, map_location="cpu", weights_only=False) if f.is_file() else None
    return client_state or {}, rank_state
