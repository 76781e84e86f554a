"""The sweep file: a base config, overrides for all, named variants, seeds.

```yaml
base: tiny_albef_elip               # a shipped config name or a path (relative to this file)
overrides: [optim.max_steps=250]    # every variant
warm_start:                         # optional: trained once, every variant starts from it
  config: tiny_clip
  overrides: [model.text.text_layers=2]
seeds: [0, 1, 2]
ranks: 2                            # trainer ranks (CPU ranks, or at most this many GPUs)
baseline: none                      # ratios in the report are to this variant
variants:
  none: [model.vision.reduction.method=none]
  tome:                             # the long form: a budget matched by measurement
    overrides: [model.vision.reduction.method=tome]
    match: token_layers             # or flops
    reference: elip-reuse
    tolerance: 0.05                 # relative
```
Every error names the file and the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, config_path, parse_override

MATCH_KINDS = ("token_layers", "flops")


@dataclass
class Variant:
    name: str
    overrides: list[str]
    match: str | None = None  # token_layers | flops
    reference: str | None = None  # the variant whose budget is matched
    tolerance: float = 0.05


@dataclass
class WarmStart:
    config: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class Sweep:
    path: Path
    base: str  # resolved: a shipped name or an absolute path
    overrides: list[str]
    variants: dict[str, Variant]
    seeds: list[int]
    ranks: int
    baseline: str
    warm_start: WarmStart | None = None

    def to_dict(self) -> dict:
        return {"path": str(self.path), "base": self.base, "overrides": self.overrides, "seeds": self.seeds,
                "ranks": self.ranks, "baseline": self.baseline,
                "warm_start": None if self.warm_start is None else vars(self.warm_start),
                "variants": {n: {k: v for k, v in vars(var).items() if k != "name"}
                             for n, var in self.variants.items()}}


def shipped_sweeps() -> list[str]:
    root = resources.files("pipeline.configs").joinpath("sweeps")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def sweep_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or "/" in str(name_or_path):
        if not p.is_file():
            raise ConfigError(f"sweep: no such file {str(p)!r}")
        return p
    shipped = resources.files("pipeline.configs").joinpath("sweeps", f"{name_or_path}.yaml")
    if not shipped.is_file():
        raise ConfigError(f"sweep: no shipped sweep {str(name_or_path)!r}; shipped: {shipped_sweeps()}")
    return Path(str(shipped))


def _overrides(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of key=value strings, got {value!r}")
    for text in value:
        try:
            parse_override(text)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    return list(value)


def _resolve_config(name: Any, where: str, sweep_file: Path) -> str:
    """A config name stays a name; a path is taken relative to the sweep file."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: expected a config name or path, got {name!r}")
    if name.endswith((".yaml", ".yml")) or "/" in name:
        p = Path(name)
        p = p if p.is_absolute() else (sweep_file.parent / p)
        if not p.is_file():
            raise ConfigError(f"{where}: no such file {str(p)!r}")
        return str(p.resolve())
    try:
        config_path(name)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return name


def _variant(name: str, value: Any, where: str) -> Variant:
    if isinstance(value, list) or value is None:
        return Variant(name, _overrides(value, where))
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a list of overrides or a mapping, got {value!r}")
    unknown = set(value) - {"overrides", "match", "reference", "tolerance"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key; known: match, overrides, reference, tolerance")
    match = value.get("match")
    if match is not None and match not in MATCH_KINDS:
        raise ConfigError(f"{where}.match: expected one of {list(MATCH_KINDS)}, got {match!r}")
    if match is not None and not isinstance(value.get("reference"), str):
        raise ConfigError(f"{where}.reference: required with match (the variant whose budget is matched)")
    tolerance = value.get("tolerance", 0.05)
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not 0 < tolerance < 1:
        raise ConfigError(f"{where}.tolerance: expected a relative tolerance in (0, 1), got {tolerance!r}")
    return Variant(name, _overrides(value.get("overrides"), f"{where}.overrides"), match,
                   value.get("reference"), float(tolerance))


def load_sweep(name_or_path: str | Path) -> Sweep:
    path = sweep_path(name_or_path).resolve()
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    known = {"base", "overrides", "warm_start", "seeds", "ranks", "baseline", "variants"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{path}: {sorted(unknown)[0]}: unknown key; known: {sorted(known)}")
    if "base" not in data:
        raise ConfigError(f"{path}: base: required key is missing")
    base = _resolve_config(data["base"], f"{path}: base", path)
    variants_raw = data.get("variants")
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise ConfigError(f"{path}: variants: expected a non-empty mapping of name -> overrides")
    variants = {}
    for name, value in variants_raw.items():
        if not isinstance(name, str) or not name or "/" in name or name.startswith(".") or name == "warm_start":
            raise ConfigError(f"{path}: variants: {name!r} is not a usable directory name")
        variants[name] = _variant(name, value, f"{path}: variants.{name}")
    for v in variants.values():
        if v.match and v.reference not in variants:
            raise ConfigError(f"{path}: variants.{v.name}.reference: {v.reference!r} is not a variant of this sweep")
        if v.match and variants[v.reference].match:
            raise ConfigError(f"{path}: variants.{v.name}.reference: {v.reference!r} is itself matched")
    seeds = data.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: seeds: expected a non-empty list of distinct ints, got {seeds!r}")
    ranks = data.get("ranks", 2)
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise ConfigError(f"{path}: ranks: expected a positive int, got {ranks!r}")
    baseline = data.get("baseline", next(iter(variants)))
    if baseline not in variants:
        raise ConfigError(f"{path}: baseline: {baseline!r} is not a variant; variants: {list(variants)}")
    warm = data.get("warm_start")
    warm_start = None
    if warm is not None:
        if not isinstance(warm, dict) or "config" not in warm or set(warm) - {"config", "overrides"}:
            raise ConfigError(f"{path}: warm_start: expected a mapping with config (and overrides), got {warm!r}")
        warm_start = WarmStart(_resolve_config(warm["config"], f"{path}: warm_start.config", path),
                               _overrides(warm.get("overrides"), f"{path}: warm_start.overrides"))
    return Sweep(path, base, _overrides(data.get("overrides"), f"{path}: overrides"), variants,
                 seeds, ranks, baseline, warm_start)
