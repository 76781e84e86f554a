"""Budgets matched by measurement: the value of a method's own knob that makes its measured
forward pass spend what a reference variant spends (vision token-layers or FLOPs).

Equal settings by name are not equal budgets (EViT's layers mean something else than ELIP's),
so the knob is searched, not copied.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from pipeline.config import ConfigError, ExperimentConfig


@dataclass(frozen=True)
class Knob:
    key: str  # the dotted override the search sets
    candidates: Callable[[ExperimentConfig], Sequence]  # sorted so that the budget is monotone in them
    cast: type


def _tome_r(cfg: ExperimentConfig) -> list[int]:
    return list(range(0, 257))  # values the model cannot take are refused by the config check, and skipped


def _keep_rates(cfg: ExperimentConfig) -> list[float]:
    return [round(0.05 + 0.01 * i, 2) for i in range(96)]  # 0.05 .. 1.00


# The searched key per reduction method ("adaptive": ELIP with a per-image budget); each knob's
# budget grows with its value.
KNOBS: dict[str, Knob] = {
    "tome": Knob("model.vision.reduction.r", _tome_r, int),
    "evit": Knob("model.vision.reduction.keep_rate", _keep_rates, float),
    "flip": Knob("model.vision.reduction.flip_keep", _keep_rates, float),
    "adaptive": Knob("model.vision.reduction.budget_tau", _keep_rates, float),
}


def reduction_method(cfg: ExperimentConfig) -> str:
    """The KNOBS entry of ``cfg``'s reduction: its method, or ``adaptive`` for ELIP with a
    per-image budget (``budget_tau > 0``)."""
    vision = getattr(cfg.model, "vision", None)
    reduction = getattr(vision, "reduction", None)
    if reduction is None:
        raise ConfigError(f"match: model {cfg.model.name!r} has no model.vision.reduction to match")
    if reduction.method == "elip" and reduction.budget_tau > 0:
        return "adaptive"
    return reduction.method


def search(measure: Callable[[object], float | None], candidates: Sequence, target: float) -> tuple[object, float]:
    """The candidate whose ``measure`` is closest to ``target``, by bisection over ``candidates``
    ordered so that ``measure`` is monotone in them. ``measure`` returns None for a value the
    config refuses; the accepted values must be one contiguous run starting at the first
    accepted one (e.g. ToMe's r is refused above what the token count allows). Returns
    ``(candidate, measured)``."""
    cache: dict[int, float | None] = {}

    def at(i: int) -> float | None:
        if i not in cache:
            cache[i] = measure(candidates[i])
        return cache[i]

    lo = next((i for i in range(len(candidates)) if at(i) is not None), None)
    if lo is None:
        raise ConfigError("match: no candidate value is accepted by the config")
    hi = len(candidates) - 1
    if at(hi) is None:  # bisect for the last accepted value
        ok, bad = lo, hi
        while bad - ok > 1:
            mid = (ok + bad) // 2
            ok, bad = (mid, bad) if at(mid) is not None else (ok, mid)
        hi = ok
    increasing = at(hi) >= at(lo)
    while hi - lo > 1:  # keep target between at(lo) and at(hi)
        mid = (lo + hi) // 2
        if (at(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda i: abs(at(i) - target))
    return candidates[best], at(best)


def match_budget(kind: str, reference_cfg: ExperimentConfig, load: Callable[[list[str]], ExperimentConfig],
                 measure: Callable[[ExperimentConfig], dict], tolerance: float) -> dict:
    """Pick the knob of ``load([])``'s method whose measured ``kind`` is nearest the reference's.

    ``load(extra_overrides)`` resolves the variant with more overrides (raising ConfigError for a
    value the model cannot take); ``measure`` is :func:`pipeline.compare.measure.forward_budget`.
    Returns what was chosen and measured; ``within_tolerance`` says whether it met the budget."""
    method = reduction_method(load([]))
    if method not in KNOBS:
        raise ConfigError(f"match: no searched key for reduction.method={method!r}; known: {sorted(KNOBS)}")
    knob = KNOBS[method]
    reference = measure(reference_cfg)
    target = float(reference[kind])

    def value_of(candidate) -> float | None:
        try:
            cfg = load([f"{knob.key}={candidate}"])
        except ConfigError:
            return None
        return float(measure(cfg)[kind])

    chosen, got = search(value_of, knob.candidates(load([])), target)
    rel = abs(got - target) / target if target else 0.0
    return {"kind": kind, "key": knob.key, "value": knob.cast(chosen), "override": f"{knob.key}={chosen}",
            "target": target, "measured": got, "relative_error": rel, "tolerance": tolerance,
            "within_tolerance": rel <= tolerance, "measured_on": reference.get("measured_on")}
