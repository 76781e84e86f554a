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

from pipeline.models.layers import grow_rows, resize_pos_embed

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


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: missing, damaged (truncated, not a torch file) or
    holding objects outside the allow-list. The message names the file."""


def _allowed_globals() -> list:
    """The only classes (besides tensors and plain containers) unpickled from a checkpoint: the
    ones DeepSpeed's ZeRO optimizer partitions hold. Everything else is refused."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _reason(err: BaseException) -> str:
    """The telling line of torch's (long, multi-paragraph) load errors."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line
    return lines[0] if lines else type(err).__name__


def load_file(path: str | Path, *, map_location="cpu", mmap: bool = False):
    """``torch.load`` with ``weights_only=True`` and the DeepSpeed allow-list: no code in a
    downloaded checkpoint runs. Every failure is a :class:`CheckpointError` naming ``path``."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported" in str(err):
            raise CheckpointError(f"checkpoint file {path} holds objects outside the allow-list, refused "
                                  f"(nothing was executed): {_reason(err)}") from None
        raise CheckpointError(f"checkpoint file {path} is damaged: {_reason(err)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint file {path} is damaged: {_reason(err)}") from None


def check_file(path: str | Path) -> None:
    """Cheap check before an engine touches a checkpoint (resume fallback): the file opens as a
    torch archive (a truncated one has lost its central directory) and its pickle names no class
    outside the allow-list. The real load is still ``weights_only``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as err:  # torch raises RuntimeError, pickle/zip errors alike for a bad archive
        raise CheckpointError(f"checkpoint file {path} is damaged: {_reason(err)}") from None
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in _allowed_globals()}
    refused = [g for g in found if g not in allowed]
    if refused:
        raise CheckpointError(f"checkpoint file {path} holds objects outside the allow-list, refused: {refused[:4]}")


def _zero_model_states(files: list[Path]) -> list:
    """DeepSpeed's ``zero_to_fp32.parse_model_states``, reading through :func:`load_file`."""
    from deepspeed.checkpoint.constants import BUFFER_NAMES, DS_VERSION, FROZEN_PARAM_FRAGMENTS, FROZEN_PARAM_SHAPES, PARAM_SHAPES
    from deepspeed.utils.zero_to_fp32 import zero_model_state

    states = []
    for f in files:
        sd = load_file(f)
        if BUFFER_NAMES not in sd or PARAM_SHAPES not in sd:
            raise CheckpointError(f"checkpoint file {f} is not a DeepSpeed model state file (no {BUFFER_NAMES!r})")
        buffers = {k: v.float() if v.is_floating_point() else v for k, v in sd["module"].items()
                   if k in sd[BUFFER_NAMES]}
        states.append(zero_model_state(
            buffers=buffers, param_shapes=sd[PARAM_SHAPES], shared_params=[list(kv) for kv in sd["shared_params"].items()],
            ds_version=sd.get(DS_VERSION), frozen_param_shapes=sd.get(FROZEN_PARAM_SHAPES),
            frozen_param_fragments=sd.get(FROZEN_PARAM_FRAGMENTS)))
    return states


def _zero_fp32_groups(files: list[Path], tag_dir: Path) -> tuple[int, int, list, object]:
    """DeepSpeed's ``zero_to_fp32.parse_optim_states`` (the fp32 master partitions), reading
    through :func:`load_file`."""
    from deepspeed.checkpoint.constants import (FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT, PARAM_ALIGNMENT_PADDINGS,
                                                PARTITION_COUNT, SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE)

    parts = []
    for f in files:
        sd = load_file(f, mmap=True)
        if ZERO_STAGE not in sd.get(OPTIMIZER_STATE_DICT, {}):
            raise CheckpointError(f"checkpoint file {f} is not a ZeRO optimizer partition (no {ZERO_STAGE!r})")
        sd[OPTIMIZER_STATE_DICT].pop(OPTIMIZER_STATE_DICT, None)  # Adam moments: not needed for weights
        parts.append(sd[OPTIMIZER_STATE_DICT])
    stage, world = int(parts[0][ZERO_STAGE]), parts[0][PARTITION_COUNT]
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(files):
        raise CheckpointError(f"checkpoint {tag_dir} was saved by {world} ranks but holds {len(files)} "
                              "ZeRO optimizer partitions")
    key = SINGLE_PARTITION_OF_FP32_GROUPS if stage <= 2 else FP32_FLAT_GROUPS
    return stage, world, [p[key] for p in parts], parts[0].get(PARAM_ALIGNMENT_PADDINGS)


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 model weights (and buffers) of a checkpoint, gathered from the ZeRO partitions; no
    process group needed, nothing unpickled beyond tensors and the allow-list. Frozen parameters
    are not in it when they were excluded from saving."""
    tag_dir = Path(tag_dir)
    optim_files = sorted(tag_dir.glob("*zero_pp_rank_*optim_states.pt"), key=_rank_of)
    if optim_files:
        from deepspeed.utils import zero_to_fp32 as z

        model_files = sorted(tag_dir.glob("*_model_states.pt"), key=_rank_of)
        states = _zero_model_states(model_files)
        stage, world, groups, paddings = _zero_fp32_groups(optim_files, tag_dir)
        # the merge itself is DeepSpeed's (it only slices the tensors read above)
        if stage <= 2:
            merged = z._get_fp32_state_dict_from_zero2_checkpoint(world, groups, states, False, paddings)
        else:
            merged = z._get_fp32_state_dict_from_zero3_checkpoint(world, groups, states, False)
        return z.to_torch_tensor(merged)
    state = load_file(tag_dir / "mp_rank_00_model_states.pt")
    return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}


def _rank_of(path: Path) -> tuple[int, str]:
    """``zero_pp_rank_10_...`` sorts after ``zero_pp_rank_9_...`` (DeepSpeed's natural order)."""
    import re

    m = re.search(r"zero_pp_rank_(\d+)", path.name)
    return (int(m.group(1)) if m else -1, path.name)


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
    gets the checkpoint's rows first, a ViT position embedding of another resolution is resampled),
    the rest keep their initialisation
    (a warm start: CLIP encoders into ALBEF). A model whose modules are named differently
    declares ``init_from_renames``, ``{source prefix: own prefix or [own prefixes]}`` (METER's
    ``text_transformer`` is CLIP's ``text_encoder``). Returns ``(tag_dir, copied, kept)``; copying nothing
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
        elif k.endswith("pos_embed") and (resized := resize_pos_embed(v, own[k])) is not None:
            copied[k] = resized  # fine-tuning at another resolution
    if not copied:
        raise ValueError(f"train.init_from={path}: no parameter of {tag_dir} matches the model by name and shape")
    model.load_state_dict(copied, strict=False)
    kept = [k for k in own if k not in copied]
    return tag_dir, sorted(copied), kept


def _renamed(state: dict[str, torch.Tensor], renames: dict[str, str | list[str]]) -> dict[str, torch.Tensor]:
    """``state`` with each key's first matching prefix in ``renames`` replaced; a list of new
    prefixes copies the value to each (ALBEF's VQA decoder starts from the fusion layers the
    encoder keeps too). A renamed copy never replaces a key the source itself holds."""
    out = {}
    for key, value in state.items():
        targets = [key]
        for old, new in renames.items():
            if key.startswith(old):
                targets = [n + key[len(old):] for n in ([new] if isinstance(new, str) else new)]
                break
        for target in targets:  # a key the source holds under its own name wins over a copy
            if target == key:
                out[target] = value
            else:
                out.setdefault(target, value)
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
