"""Checkpoints that are never picked up half-written, and the state that makes resume exact.

Layout under ``RUN_DIR/checkpoints``::

    step00001200/            one DeepSpeed tag (model, optimizer partitions, LR scheduler,
        ...                  client state: step, samples seen)
        trainer_rank00000.pt per-rank state: RNG (python, numpy, torch, cuda) and data position
        meta.json            written last, by rank 0, after every rank has finished: the marker
    latest                   tag of the newest complete checkpoint (written after meta.json)

Only tags with ``meta.json`` are resumed from; a crash in the middle of a save leaves a tag
without it, which is ignored (and pruned later).
"""
from __future__ import annotations

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

from pipeline.models.layers import grow_rows

log = logging.getLogger(__name__)

MARKER = "meta.json"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / MARKER).is_file()


def read_meta(tag_dir: Path) -> dict:
    return json.loads((tag_dir / MARKER).read_text())


def complete_tags(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [d for d in ckpt_dir.iterdir() if d.is_dir() and is_complete(d)]
    return sorted(tags, key=lambda d: (read_meta(d).get("step", -1), d.name))


def find_latest(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint: the ``latest`` file's tag if it is complete, else the
    complete tag with the highest step."""
    latest = ckpt_dir / LATEST
    if latest.is_file():
        tag_dir = ckpt_dir / latest.read_text().strip()
        if is_complete(tag_dir):
            return tag_dir
        log.warning("checkpoint %s named by %s is incomplete; looking for an older one", tag_dir, latest)
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def find_checkpoint(path: str | Path) -> Path:
    """A complete tag directory from a tag directory, a checkpoints directory or a run directory."""
    p = Path(path)
    if is_complete(p):
        return p
    for ckpt_dir in (p / "checkpoints", p):
        if ckpt_dir.is_dir():
            found = find_latest(ckpt_dir)
            if found is not None:
                return found
    raise FileNotFoundError(f"no complete checkpoint (a tag directory with {MARKER}) at {str(path)!r}")


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
        _atomic_write(tag_dir / MARKER, json.dumps(meta, indent=1))
        _atomic_write(ckpt_dir / LATEST, tag)
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


# --------------------------------------------------------------------------- weights for evaluation


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 model weights (and buffers) of a checkpoint, gathered from the ZeRO partitions; no
    process group needed. Frozen parameters are not in it when they were excluded from saving."""
    tag_dir = Path(tag_dir)
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}


def load_weights(model: torch.nn.Module, path: str | Path) -> Path:
    """Load the newest complete checkpoint under ``path`` (run dir, checkpoints dir or tag dir)
    into ``model``; returns the tag directory. Keys may be missing only for frozen parameters
    (saved with ``exclude_frozen_parameters``); any other mismatch is an error."""
    tag_dir = find_checkpoint(path)
    state = consolidated_state_dict(tag_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # remove_duplicate=False: a frozen LLM's tied lm_head.weight is a name of its own in the state dict
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {tag_dir} does not fit the model: missing {missing[:8]}, "
                           f"unexpected {list(unexpected)[:8]}")
    return tag_dir


def init_from(model: torch.nn.Module, path: str | Path) -> tuple[Path, list[str], list[str]]:
    """Initialise ``model`` from another run's newest complete checkpoint (or a tag dir): every
    parameter or buffer whose name and shape match is copied (an embedding table with more rows
    gets the checkpoint's rows first), the rest keep their initialisation
    (a warm start: CLIP encoders into ALBEF). Returns ``(tag_dir, copied, kept)``; copying nothing
    is an error, since it means the two models share no names."""
    tag_dir = find_checkpoint(path)
    source = consolidated_state_dict(tag_dir)
    own = model.state_dict()
    copied = {}
    for k, v in source.items():
        if k not in own:
            continue
        if own[k].shape == v.shape:
            copied[k] = v
        elif (grown := grow_rows(v, own[k])) is not None:  # a vocabulary that grew (BLIP's [ENC] / [DEC])
            copied[k] = grown
    if not copied:
        raise ValueError(f"train.init_from={path}: no parameter of {tag_dir} matches the model by name and shape")
    model.load_state_dict(copied, strict=False)
    kept = [k for k in own if k not in copied]
    return tag_dir, sorted(copied), kept
