"""Checkpoints that are never picked up half-written, and the state that makes resume exact.

Layout under ``RUN_DIR/checkpoints``::

    step00001200/            one DeepSpeed tag (model, optimizer partitions, LR scheduler,
        ...                  client state: step, samples seen)
        trainer_rank00000.pt per-rank state: RNG (python, numpy, torch, cuda) and data position
        meta.json            written last, by rank 0, after every rank has finished: the marker
    latest                   tag of the newest complete checkpoint (written after meta.json)

Only tags with ``meta.json`` are resumed from; a crash in the middle of a save leaves a tag
without it, which is ignored (and pruned later). Every file is fsynced before ``meta.json`` is
written. Nothing is unpickled beyond tensors, plain containers and the few DeepSpeed classes of
:func:`pipeline.models.weights.load_file`'s allow-list: the engine reads and writes through
:class:`SafeCheckpointEngine`. Finding checkpoints and reading their module weights back
(evaluation, ``train.init_from``) is :mod:`pipeline.models.weights`.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.files import atomic_write_text
from pipeline.models.weights import (LATEST, MARKER, CheckpointError, check_file, complete_tags, find_checkpoint,
                                     find_latest, is_complete, load_file, read_meta)

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
    """Every generator's state as tensors, ints and tuples of ints: loadable with
    ``weights_only=True`` (numpy's key array would need numpy in the allow-list)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {"python": [version, list(mt), gauss],
             "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in mt), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
                         "has_gauss": int(n["has_gauss"]), "gauss": float(n["gauss"])})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- file I/O


def _no_space(path: Path, err: BaseException) -> bool:
    """torch's writer reports a full disk as ``enforce fail at inline_container.cc ... unexpected
    pos``, without errno: a failed write on a filesystem with (almost) nothing left is one."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_file(obj, path: str | Path) -> None:
    """``torch.save`` + fsync; a failure is a :class:`CheckpointError` naming ``path`` ("no space
    left on device writing PATH" for a full disk)."""
    path = Path(path)
    try:
        torch.save(obj, path)
        _fsync(path)
    except (RuntimeError, OSError) as err:
        if _no_space(path, err):
            raise CheckpointError(f"no space left on device writing {path}") from None
        raise CheckpointError(f"writing checkpoint file {path} failed: {err}") from None


def _engine_class():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch engine, loading with ``weights_only=True`` and the allow-list (it
        uses ``weights_only=False``) and saving with fsync and errors that name the file."""

        def save(self, state_dict, path: str):
            save_file(state_dict, path)

        def load(self, path: str, map_location=None):
            return load_file(path, map_location=map_location if map_location is not None else "cpu")

    return SafeCheckpointEngine


def use_safe_engine(engine) -> None:
    """Route the DeepSpeed engine's checkpoint reads and writes through ``SafeCheckpointEngine``
    (model states and ZeRO partitions both go through ``engine.checkpoint_engine``)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise ValueError(f"DeepSpeed config: checkpoint engine {type(engine.checkpoint_engine).__name__} is not "
                         "supported (its loads are not weights_only); drop the 'checkpoint' writer / datastates "
                         "settings")
    engine.checkpoint_engine = _engine_class()(engine._config)


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
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=exclude_frozen)
        save_file(rank_state, rank_file(tag_dir, rank))
    except OSError as err:  # DeepSpeed's own writes (its recovery script, directories)
        where = Path(err.filename) if err.filename else tag_dir
        if _no_space(where, err):
            raise CheckpointError(f"no space left on device writing {where}") from None
        raise
    barrier()  # every rank's files are on disk (each fsynced its own)
    if rank == 0:
        _fsync(tag_dir)  # their directory entries too, before the marker
        meta = {"step": step, "world_size": world_size, "time": time.time(),
                **{k: v for k, v in client_state.items() if isinstance(v, (int, float, str, bool))}}
        try:
            atomic_write_text(tag_dir / MARKER, json.dumps(meta, indent=1))
            atomic_write_text(ckpt_dir / LATEST, tag)
        except OSError as err:
            if _no_space(tag_dir / MARKER, err):
                raise CheckpointError(f"no space left on device writing {tag_dir / MARKER}") from None
            raise
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


def check(tag_dir: Path) -> None:
    """Every file of a checkpoint is there, opens and names only allowed classes; raises
    :class:`CheckpointError` naming the first one that does not. Cheap (no tensor is read)."""
    model = [tag_dir / "mp_rank_00_model_states.pt", tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    if not any(f.is_file() for f in model):
        raise CheckpointError(f"checkpoint file {model[0]} is missing (nor is there {model[1].name})")
    partitions = list(tag_dir.glob("*zero_pp_rank_*optim_states.pt"))
    if partitions:
        world = int(read_meta(tag_dir).get("world_size", len(partitions)))
        for r in range(world):
            if not any(tag_dir.glob(f"*zero_pp_rank_{r}_*optim_states.pt")):
                raise CheckpointError(f"checkpoint {tag_dir} was saved by {world} ranks but the ZeRO optimizer "
                                      f"partition of rank {r} is missing")
    for f in sorted(tag_dir.glob("*.pt")):
        check_file(f)


def load(engine, tag_dir: Path, *, rank: int, exclude_frozen: bool) -> tuple[dict, dict | None]:
    """Restore engine (model, optimizer, scheduler) from ``tag_dir``; returns (client_state,
    this rank's trainer state or None when the checkpoint has no file for this rank)."""
    load_path, client_state = engine.load_checkpoint(
        str(tag_dir.parent), tag=tag_dir.name, load_module_strict=not exclude_frozen,
        load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    f = rank_file(tag_dir, rank)
    rank_state: Any = load_file(f) if f.is_file() else None
    return client_state or {}, rank_state
