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
import importlib
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml


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
    every: int = 0  # zero-shot retrieval every N optimizer steps and at the end; 0 = never in training
    shards: str = ""  # evaluation shard set (brace pattern or directory with manifest.json)
    k_test: int = 256  # ITC top-k re-ranked by ITM
    batch_size: int = 64


@dataclass
class AutobatchConfig:
    # Micro-batch search before training (python -m pipeline.autobatch does it alone):
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


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against (and converted to) the annotation ``tp``; errors name ``key``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
    if origin in (list, Sequence, typing.Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = args or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a bool (true/false), got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an int, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML (YAML 1.1) reads '1e-4' as a string; accept strings that are plain numbers.
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            return float(value)
        raise ConfigError(f"{key}: expected a float, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping; missing keys take the defaults."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = _join(prefix, str(unknown[0]))
        raise ConfigError(f"{key}: unknown key; known keys of {prefix or 'the config'}: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # a dataclass' own __post_init__ validation
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{prefix or 'config'}: {err}") from err


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


def from_dict(data: dict) -> ExperimentConfig:
    """A typed :class:`ExperimentConfig` from a plain mapping (as read from YAML)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    _import_plugins(data.get("imports"))
    if "model" not in data:
        raise ConfigError("model: required section is missing")
    model = model_config_from_dict(data.pop("model"))
    cfg = _from_dict(_ExperimentRest, data, "")
    return ExperimentConfig(model=model, **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


@dataclass
class _ExperimentRest:  # ExperimentConfig without its tagged-union model section
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    autobatch: AutobatchConfig = field(default_factory=AutobatchConfig)
    imports: list[str] = field(default_factory=list)


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


def load_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a config (shipped name or path), apply overrides, and type-check it."""
    path = config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return from_dict(apply_overrides(data, overrides))


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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(path)
