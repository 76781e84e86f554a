"""Reading a run's weights: the newest complete checkpoint, its module weights gathered from
the ZeRO partitions, loaded exactly (evaluation) or by matching names (``train.init_from``).

Writing checkpoints is the trainer's job (``pipeline.train.checkpoint``); reading the module
weights back needs no engine, no process group and nothing of training, so evaluation and
warm starts use this module alone. A checkpoint is complete once its tag directory holds
``meta.json``; ``checkpoints/latest`` names the newest one.
"""
from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from pipeline.models.layers import grow_rows

log = logging.getLogger(__name__)

MARKER = "meta.json"
SHOWN_KEYS = 8  # keys named in a mismatch error
LATEST = "latest"


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
    (a warm start: CLIP encoders into ALBEF). A model whose modules are named differently
    declares ``init_from_renames``, ``{source prefix: own prefix}`` (METER's ``text_transformer``
    is CLIP's ``text_encoder``). Returns ``(tag_dir, copied, kept)``; copying nothing
    is an error, since it means the two models share no names."""
    tag_dir = find_checkpoint(path)
    source = _renamed(consolidated_state_dict(tag_dir), getattr(model, "init_from_renames", {}))
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


def _renamed(state: dict[str, torch.Tensor], renames: dict[str, str]) -> dict[str, torch.Tensor]:
    """``state`` with each key's first matching prefix in ``renames`` replaced."""
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


class WeightsMismatchError(ValueError):
    """A weights file whose keys do not account for the model's (or the other way round)."""


def check_key_account(source: str, missing: Iterable[str], unused: Iterable[str], *,
                      may_miss: Iterable[str] = (), may_leave: Iterable[str] = (), hint: str = "") -> None:
    """Refuse a load unless every difference between a model and a weights file is expected.

    ``missing``: the model's keys that got no value from ``source``; ``unused``: the file's keys
    that went nowhere. ``may_miss`` / ``may_leave`` are :mod:`fnmatch` patterns of the keys that
    are expected to differ (a classifier head, a dropped last layer, fresh fusion layers, a
    pooler). Anything else raises :class:`WeightsMismatchError` naming ``source`` and the first
    keys of each kind: a renamed key or a foreign format must never train from random weights.
    """
    may_miss, may_leave = list(may_miss), list(may_leave)
    bad_missing = [k for k in missing if not any(fnmatch.fnmatchcase(k, p) for p in may_miss)]
    bad_unused = [k for k in unused if not any(fnmatch.fnmatchcase(k, p) for p in may_leave)]
    if not bad_missing and not bad_unused:
        return
    parts = []
    if bad_missing:
        parts.append(f"{len(bad_missing)} model weights get no value: {bad_missing[:SHOWN_KEYS]}")
    if bad_unused:
        parts.append(f"{len(bad_unused)} weights in the file are not used: {bad_unused[:SHOWN_KEYS]}")
    raise WeightsMismatchError(f"{source}: does not fit the model: " + "; ".join(parts) + (f" ({hint})" if hint else ""))
