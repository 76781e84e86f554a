"""Experiment configuration: typed dataclasses loaded from YAML, with ``key=value`` overrides.

A config is given by name (``tiny_albef_elip`` -> ``pipeline/configs/tiny_albef_elip.yaml``,
shipped as package data) or by path. Overrides use dotted keys (``optim.lr=3e-4``,
``model.vit.depth=4``) and their values are read as YAML scalars or lists (``[0.5, 1.0]``).

The ``model`` section is a tagged union: its ``name`` picks the dataclass registered with
``pipeline.models.register_model`` and the rest of the section fills that dataclass.

Every error names the dotted key it is about: an unknown key, a wrong type, a missing value.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from pipeline.files import atomic_write_text


class ConfigError(ValueError):
    """A config problem; the message starts with the dotted key it is about."""


# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    # Training shards: sources joined with '::' (``coco::vg::sbu::cc3m``), each a brace pattern
    # (``/data/cc3m/{00000..00331}.tar``) or a directory holding a data_prep ``manifest.json``.
    train_shards: str = ""
    # Per-source sampling weights (one per '::' source); requires ``resampled: true``.
    train_weights: list[float] | None = None
    # Samples per epoch; by default read from the sources' manifest.json (or open_clip's sizes.json).
    train_num_samples: int | None = None
    image_size: int = 256
    batch_size: int = 64  # per GPU (per rank), per micro-step
    workers: int = 4  # dataloader worker processes per rank
    shuffle_buffer: int = 1000  # sample shuffle buffer (per worker); 0 disables
    resampled: bool = False  # sample shards with replacement (weighted) instead of epoch passes
    seed: int = 0  # data order: shard and sample shuffles, augmentations
    max_words: int = 30  # captions are cut to this many words (ALBEF pre_caption)
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # RandomResizedCrop scale
    hflip: bool = True  # random horizontal flip (off for captions that say "left"/"right")
    randaugment: bool = True  # ALBEF's RandomAugment(2, 7) op set on torchvision's RandAugment


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak learning rate (after warm-up)
    min_lr: float = 1e-5  # cosine floor
    warmup_lr: float = 1e-5  # learning rate at step 0, linearly raised to ``lr``
    warmup_steps: int = 0  # warm-up length in optimizer steps ...
    warmup_fraction: float = 0.0  # ... or as a fraction of all steps (set one of the two)
    weight_decay: float = 0.02  # not applied to biases, norms and 1-d parameters
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    epochs: int = 1
    max_steps: int = 0  # optimizer steps in total; 0 -> epochs * steps per epoch


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    # DeepSpeed JSON: a name in ds_configs/ (zero1, zero2, zero3, zero3_offload) or a path.
    deepspeed: str = "zero2"
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    grad_clip: float = 0.0  # max global gradient norm; 0 disables
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_checkpointing: bool = False
    checkpoint_every: int = 1000  # optimizer steps; 0 -> only at the end and on signals
    keep_checkpoints: int = 3  # complete checkpoints kept; 0 keeps all
    log_every: int = 50
    image_grid_every: int = 500  # kept-patch image grid in TensorBoard; 0 disables
    image_grid_samples: int = 4
    resume: str = "latest"  # latest | none | path to a run dir, checkpoints dir or checkpoint tag
    seed: int = 42  # model init and training randomness (each rank adds its rank)
    stop_at_step: int = 0  # stop with a checkpoint after this step, schedule unchanged; 0 = run to the end
    # Warm start: copy every weight whose name and shape match from this run / checkpoint before
    # training (e.g. a CLIP run's encoders into ALBEF); the rest keep their initialisation.
    # Ignored when the run resumes from its own checkpoint.
    init_from: str = ""
    # Leave parameters with requires_grad=False out of checkpoints (a frozen LLM that the model
    # reloads from its own weights). Not for EMA teachers (ALBEF's momentum encoders): they change.
    exclude_frozen_parameters: bool = False


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N optimizer steps and at the end; 0 = never in training
    every_epochs: int = 0  # also at the end of every N epochs (fine-tuning recipes evaluate each epoch)
    task: str = ""  # the evaluation eval.every runs (pipeline.eval.tasks: retrieval, caption, vqa); "" = the model's
    shards: str = ""  # evaluation shard set (brace pattern or directory with manifest.json)
    k_test: int = 256  # ITC top-k re-ranked by ITM
    batch_size: int = 64


@dataclass
class AutobatchConfig:
    # Micro-batch search before training (python -m pipeline.train.autobatch does it alone):
    # off | free (the device's free memory less ``margin``) | baseline (what the unpruned model
    # needs at data.batch_size: ELIP+'s "same memory, bigger batch") | a number of GiB.
    budget: str | float = "off"
    margin: float = 0.1  # fraction of the free memory left unused (budget=free)
    # What the found micro-batch m changes, b being data.batch_size:
    #   scale_lr: batch m, lr / min_lr / warmup_lr times m / b (linear scaling rule)
    #   keep_lr: batch m, learning rates unchanged
    #   keep_global: global batch unchanged; the largest divisor of b * grad_accum that fits
    #                becomes the micro-batch, and grad_accum makes up the rest
    rule: Literal["scale_lr", "keep_lr", "keep_global"] = "scale_lr"
    max_batch: int = 1024
    probes: int = 6  # forward + backward probes at most (two fit the line, the rest verify)


@dataclass
class ExperimentConfig:
    model: Any  # the dataclass registered under ``model.name``
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    autobatch: AutobatchConfig = field(default_factory=AutobatchConfig)
    # Modules imported before the model section is read (out-of-tree models register themselves).
    imports: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- typing


def _forbid_unknown_keys(tp: Any, seen: set) -> None:
    """Give every dataclass reachable from ``tp`` pydantic's ``extra="forbid"`` (an unknown
    key is an error) unless it declares a pydantic config of its own."""
    for arg in typing.get_args(tp):
        _forbid_unknown_keys(arg, seen)
    if not dataclasses.is_dataclass(tp) or tp in seen:
        return
    seen.add(tp)
    if "__pydantic_config__" not in vars(tp):
        tp.__pydantic_config__ = ConfigDict(extra="forbid")
    for hint in typing.get_type_hints(tp).values():
        _forbid_unknown_keys(hint, seen)


@functools.lru_cache(maxsize=None)
def _adapter(cls: type) -> TypeAdapter:
    _forbid_unknown_keys(cls, set())
    return TypeAdapter(cls)


def _dotted(prefix: str, loc: tuple) -> str:
    key = prefix
    for part in loc:
        key = f"{key}[{part}]" if isinstance(part, int) else (f"{key}.{part}" if key else str(part))
    return key or "config"


def _field_type(cls: type, loc: tuple) -> Any:
    """The annotation at field path ``loc`` below dataclass ``cls`` (None where the path leaves
    the dataclasses, e.g. a union member's tag)."""
    tp: Any = cls
    for part in loc:
        if isinstance(part, int):
            args = typing.get_args(tp)
            tp = args[0] if args else Any
            continue
        candidates = [tp, *typing.get_args(tp)]
        owner = next((c for c in candidates if dataclasses.is_dataclass(c)), None)
        if owner is None or part not in {f.name for f in dataclasses.fields(owner)}:
            return None
        tp = typing.get_type_hints(owner)[part]
    return tp


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


_EXPECTED = {"int": "an int", "float": "a float", "bool": "a bool (true/false)", "string": "a string",
             "list": "a list", "tuple": "a list", "dict": "a mapping", "dataclass": "a mapping"}


def _message(cls: type, prefix: str, errors: list[dict]) -> str:
    """One line for pydantic's first error, starting with the dotted key it is about."""
    err = errors[0]
    loc = tuple(err["loc"])
    # a union reports one error per member, each under the member's tag: name the field instead
    while loc and _field_type(cls, loc) is None and not (err["type"] == "unexpected_keyword_argument"):
        loc = loc[:-1]
    key, kind, value = _dotted(prefix, loc), err["type"], err.get("input")
    got = f"got {type(value).__name__} {value!r}"
    if kind == "unexpected_keyword_argument":
        owner = _field_type(cls, loc[:-1])
        owner = next((c for c in (owner, *typing.get_args(owner)) if dataclasses.is_dataclass(c)), None)
        known = sorted(f.name for f in dataclasses.fields(owner)) if owner else []
        return f"{key}: unknown key; known keys of {_dotted(prefix, loc[:-1])}: {known}"
    if kind in ("missing", "missing_argument"):
        return f"{key}: required key is missing"
    if kind == "literal_error":
        return f"{key}: expected one of {list(typing.get_args(_field_type(cls, loc)))}, {got}"
    if kind == "value_error":  # a dataclass' own __post_init__ check
        return f"{key}: {err['ctx']['error']}"
    if len(errors) > 1 and tuple(errors[1]["loc"])[: len(loc)] == loc:
        return f"{key}: expected {_type_name(_field_type(cls, loc))}, {got}"
    base = kind.split("_")[0]
    if base in _EXPECTED:
        return f"{key}: expected {_EXPECTED[base]}, {got}"
    return f"{key}: {err['msg']}, {got}"


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    """Dataclass ``cls`` validated from a mapping (pydantic); missing keys take the defaults."""
    try:
        return _adapter(cls).validate_python({} if data is None else data)
    except ValidationError as err:
        raise ConfigError(_message(cls, prefix, err.errors())) from None


def model_config_from_dict(data: Any, prefix: str = "model") -> Any:
    """The typed model section: ``name`` picks the registered dataclass, the rest fills it."""
    from pipeline.models import model_entry

    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping with a 'name', got {data!r}")
    if "name" not in data:
        raise ConfigError(f"{prefix}.name: required key is missing")
    name = data["name"]
    if not isinstance(name, str):
        raise ConfigError(f"{prefix}.name: expected a string, got {name!r}")
    try:
        entry = model_entry(name)
    except KeyError as err:
        raise ConfigError(str(err.args[0]) if err.args else f"{prefix}.name: unknown model {name!r}") from None
    field_names = {f.name for f in dataclasses.fields(entry.config_cls)}
    if "name" not in field_names:
        raise ConfigError(f"{prefix}.name: the config class of {name!r} has no 'name' field")
    return _from_dict(entry.config_cls, data, prefix)


def _import_plugins(modules: Any) -> None:
    if modules is None:
        return
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(f"imports: expected a list of module names, got {modules!r}")
    for i, module in enumerate(modules):
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"imports[{i}]: cannot import {module!r}: {err}") from err


def from_dict(data: dict, run_imports: bool = True) -> ExperimentConfig:
    """A typed :class:`ExperimentConfig` from a plain mapping (as read from YAML).

    ``run_imports=False`` leaves the ``imports:`` modules unimported (a config from a run
    directory someone else wrote must not run code); its model must then be a known one."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    if run_imports:
        _import_plugins(data.get("imports"))
    if "model" not in data:
        raise ConfigError("model: required section is missing")
    try:
        model = model_config_from_dict(data.pop("model"))
    except ConfigError as err:
        if run_imports or not data.get("imports"):
            raise
        raise ConfigError(f"{err} (this config's imports: {data['imports']} were not imported: a config read "
                          "from a run directory runs no code)") from None
    cfg = _from_dict(ExperimentConfig, {**data, "model": model}, "")  # ``model: Any`` takes it as it is
    check(cfg)
    return cfg


def check(cfg: ExperimentConfig) -> None:
    """What can be refused before any model is built or any rank starts: the model section's
    own checks (:func:`pipeline.models.checks.check_model_config`) and its agreement with the
    data section."""
    from pipeline.models.checks import check_model_config

    try:
        check_model_config(cfg.model, image_size=cfg.data.image_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None


# --------------------------------------------------------------------------- files and overrides


def config_path(name_or_path: str | Path) -> Path:
    """A shipped config name (``tiny_albef_elip``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists() or "/" in str(name_or_path):
        if not p.is_file():
            raise ConfigError(f"--config: no such file {str(p)!r}")
        return p
    shipped = resources.files("pipeline.configs").joinpath(f"{name_or_path}.yaml")
    if not shipped.is_file():
        raise ConfigError(f"--config: no shipped config {str(name_or_path)!r}; shipped: {shipped_configs()}")
    return Path(str(shipped))


def shipped_configs() -> list[str]:
    root = resources.files("pipeline.configs")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=3e-4'`` -> ``('optim.lr', 3e-4)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"{text}: an override must look like key=value (dotted key)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{text}: an override needs a dotted key like train.run_dir=...")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``key=value`` overrides to a plain mapping (in place) and return it."""
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section (override {text!r})")
            node = child
        node[parts[-1]] = value
    return data


def load_config(name_or_path: str | Path, overrides: Sequence[str] = (), run_imports: bool = True) -> ExperimentConfig:
    """Read a config (shipped name or path), apply overrides, and type-check it.

    ``run_imports=False``: for a config that came with a run directory (see :func:`from_dict`)."""
    path = config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return from_dict(apply_overrides(data, overrides), run_imports=run_imports)


def to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config or any part of it."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config (loadable again with :func:`load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, dump_config(cfg))
