"""Automatic micro-batch size: the largest batch whose training step fits a memory budget.

    python -m pipeline.train.autobatch --config albef_elip autobatch.budget=baseline [--world-size 8] [--json]

or ``autobatch.budget=...`` in a training config, which searches before the first step.

Memory per rank is modelled as ``states + activations(b)``:

- *states*: weights, gradients and AdamW state, from the ZeRO stage and precision with
  DeepSpeed's memory model: per trainable parameter 2 + 2 + 12 bytes in bf16/fp16 (half
  weights and gradients, fp32 master weights and two moments), 4 + 4 + 8 in fp32; stage 1
  shards the optimizer state over the data-parallel ranks, stage 2 the gradients too, stage 3
  the weights too. Frozen parameters count their weights only.
- *activations(b)*: measured by a real forward + backward of the configured model and
  reduction at batch ``b``: on CUDA the peak allocated above the resting model, less the
  gradients (counted in the states); on CPU the bytes autograd saves for backward, a
  deterministic proxy that makes the search testable here.

Activations grow close to linearly in ``b``: two probes fit the line, whose solution is then
verified by a probe, and refitted through the failing point while over budget. An out-of-memory
probe is caught, the cache cleared, and the batch shrunk (accelerate's
``find_executable_batch_size`` idea, with the line sparing most of its halvings).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from pipeline.config import AutobatchConfig, ConfigError, ExperimentConfig, load_config
from pipeline.device import pick_device
from pipeline.models import build_model
from pipeline.tokens.plan import ReductionConfig

from pipeline.models.layers import DTYPES

from .optim import build_ds_config
from .profile import measure_step

log = logging.getLogger(__name__)

GIB = 2**30
MIN_BATCH = 2  # ITM hard negatives need two samples: no probe goes below this
PROBE_CAPTION_WORD = "picture"  # one vocabulary word, repeated to the longest caption the config allows


class _ProbesExhausted(Exception):
    pass


@dataclass
class Probe:
    batch: int
    activation_bytes: int | None  # None: out of memory


@dataclass
class AutobatchResult:
    micro_batch: int
    budget_bytes: int
    state_bytes: int
    bytes_per_sample: float  # slope of the activation line
    fixed_bytes: float  # its intercept
    probes: list[Probe] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AutobatchResult":
        return cls(**{**d, "probes": [Probe(**p) for p in d.get("probes", [])]})


# --------------------------------------------------------------------------- memory model


def model_state_bytes(model: torch.nn.Module, precision: str, zero_stage: int, world_size: int) -> int:
    """Bytes per rank for weights, gradients and AdamW state (see the module docstring)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    half = precision in ("bf16", "fp16")
    weight, grad, optim = (2, 2, 12) if half else (4, 4, 8)
    n = max(1, world_size)
    shard_optim, shard_grad, shard_weight = zero_stage >= 1, zero_stage >= 2, zero_stage >= 3
    per_param = (weight / n if shard_weight else weight) + (grad / n if shard_grad else grad) \
        + (optim / n if shard_optim else optim)
    frozen_bytes = frozen * (2 if half else 4) / (n if shard_weight else 1)
    return int(trainable * per_param + frozen_bytes)


def probe_batch(cfg: ExperimentConfig, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """A synthetic batch of ``batch`` images and captions as long as ``data.max_words`` allows."""
    size = cfg.data.image_size
    gen = torch.Generator().manual_seed(batch)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device, dtype)
    caption = " ".join([PROBE_CAPTION_WORD] * cfg.data.max_words)
    return {"image": images, "text": [caption] * batch, "epoch_progress": 1.0}


def is_out_of_memory(err: BaseException) -> bool:
    from accelerate.utils.memory import should_reduce_batch_size

    return should_reduce_batch_size(err)


def activation_meter(model: torch.nn.Module, cfg: ExperimentConfig, device: torch.device,
                     dtype: torch.dtype) -> Callable[[int], int | None]:
    """``measure(b)``: activation bytes of one forward + backward at batch ``b``; None when out of memory."""
    def step(batch: dict) -> None:
        model(batch)["loss"].backward()

    def measure(b: int) -> int | None:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        try:
            batch = probe_batch(cfg, b, device, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                step(batch)
                torch.cuda.synchronize(device)
                grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
                return int(torch.cuda.max_memory_allocated(device) - base - grads)
            return measure_step(lambda: step(batch), model.parameters()).activation_bytes
        except Exception as err:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_out_of_memory(err):
                raise
            return None
        finally:
            batch = None
            model.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    return measure


# --------------------------------------------------------------------------- search


def _line(p: Probe, q: Probe) -> tuple[float, float]:
    """(slope, intercept) through two measured probes; a non-increasing pair falls back to the origin."""
    slope = (q.activation_bytes - p.activation_bytes) / (q.batch - p.batch)
    if slope <= 0:
        slope = q.activation_bytes / q.batch
        return slope, 0.0
    return slope, p.activation_bytes - slope * p.batch


def find_micro_batch(measure: Callable[[int], int | None], budget_bytes: int, state_bytes: int, start: int,
                     max_batch: int = 1024, max_probes: int = 6, verify: bool = True) -> AutobatchResult:
    """The largest micro-batch ``b <= max_batch`` with ``state_bytes + measure(b) <= budget_bytes``.

    ``start`` (the configured batch, at least 4) seeds the two line-fitting probes (``start // 2``
    and ``start``); at most ``max_probes`` calls of ``measure`` in all. ``verify=False`` returns the
    line's answer unprobed (a benchmark's cheap estimate where ``measure`` is exactly linear,
    as saved-for-backward bytes are).
    """
    room = budget_bytes - state_bytes
    if room <= 0:
        raise ValueError(f"autobatch: the model states alone ({state_bytes / GIB:.2f} GiB per rank) exceed the "
                         f"budget ({budget_bytes / GIB:.2f} GiB)")
    probes: list[Probe] = []

    def run(b: int) -> Probe:
        if len(probes) >= max_probes:
            raise _ProbesExhausted
        probe = Probe(b, measure(b))
        probes.append(probe)
        log.info("autobatch probe: batch %d -> %s", b, "out of memory" if probe.activation_bytes is None
                 else f"{probe.activation_bytes / GIB:.3f} GiB activations")
        return probe

    def fits(p: Probe) -> bool:
        return p.activation_bytes is not None and p.activation_bytes <= room

    if max_probes < 3:
        raise ConfigError(f"autobatch.probes: at least 3 (two fit the line, one verifies), got {max_probes}")
    # Two fitting points for the line, halving past out-of-memory (the accelerate way).
    hi = run(max(4, min(start, max_batch)))
    while hi.activation_bytes is None and hi.batch > 4:
        hi = run(hi.batch // 2)
    if hi.activation_bytes is None:
        raise ValueError(f"autobatch: batch {hi.batch} runs out of memory; nothing fits")
    lo = run(hi.batch // 2)
    if lo.activation_bytes is None:
        raise ValueError(f"autobatch: batch {lo.batch} runs out of memory after batch {hi.batch} did not")
    slope, intercept = _line(lo, hi)
    best = max((p for p in (lo, hi) if fits(p)), key=lambda p: p.batch, default=None)
    candidate = max(MIN_BATCH, min(max_batch, math.floor((room - intercept) / slope)))
    if not verify:
        return AutobatchResult(micro_batch=candidate, budget_bytes=int(budget_bytes), state_bytes=int(state_bytes),
                               bytes_per_sample=slope, fixed_bytes=intercept, probes=probes)
    # Verify, keeping the bracket (largest batch known to fit, smallest known not to): a fit
    # stops the search where the line agrees; over budget refits the line through the failing
    # point; out of memory, or a line pointing past the bracket, bisects it.
    too_big = min((p.batch for p in probes if not fits(p)), default=max_batch + 1)
    try:
        while True:
            floor = best.batch if best else MIN_BATCH - 1
            if too_big - floor <= 1 or (best is not None and candidate <= floor):
                break
            if candidate >= too_big:
                candidate = (floor + too_big) // 2
            probe = run(max(candidate, floor + 1))
            if fits(probe):
                best = probe
            else:
                too_big = probe.batch
                if probe.activation_bytes is not None:
                    slope, intercept = _line(best or lo, probe)
            candidate = math.floor((room - intercept) / slope) if probe.activation_bytes is not None \
                else (floor + too_big) // 2
    except _ProbesExhausted:
        log.warning("autobatch: %d probes used; taking the largest batch measured to fit", max_probes)
    if best is None:
        raise ValueError(f"autobatch: no batch fits {room / GIB:.3f} GiB of activation room "
                         f"(batch {lo.batch} needs {lo.activation_bytes / GIB:.3f} GiB)")
    return AutobatchResult(micro_batch=best.batch, budget_bytes=int(budget_bytes), state_bytes=int(state_bytes),
                           bytes_per_sample=slope, fixed_bytes=intercept, probes=probes)


# --------------------------------------------------------------------------- budgets and rules


def parse_budget(cfg: AutobatchConfig) -> str | float:
    """``off`` | ``free`` | ``baseline`` | GiB as a float; anything else is an error naming the key."""
    if cfg.budget in ("off", "free", "baseline"):
        return cfg.budget
    try:
        gib = float(cfg.budget)
    except (TypeError, ValueError):
        raise ConfigError(f"autobatch.budget: expected off, free, baseline or a number of GiB, got {cfg.budget!r}") from None
    if gib <= 0:
        raise ConfigError(f"autobatch.budget: must be positive, got {cfg.budget!r}")
    return gib


def free_memory_bytes(device: torch.device, local_world_size: int = 1) -> int:
    """What this rank may use: the GPU's free memory plus what this process already holds; on
    CPU the available RAM shared by the node's ranks."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.virtual_memory().available / max(1, local_world_size))


def apply_rule(cfg: ExperimentConfig, micro_batch: int) -> tuple[ExperimentConfig, str]:
    """A copy of ``cfg`` with the found micro-batch applied by ``autobatch.rule``; and what changed."""
    cfg = copy.deepcopy(cfg)
    b, accum, rule = cfg.data.batch_size, cfg.train.grad_accum, cfg.autobatch.rule
    if rule == "keep_global":
        per_rank = b * accum
        micro = max(d for d in range(1, min(micro_batch, per_rank) + 1) if per_rank % d == 0)
        cfg.data.batch_size, cfg.train.grad_accum = micro, per_rank // micro
        return cfg, (f"data.batch_size {b} -> {micro}, train.grad_accum {accum} -> {per_rank // micro} "
                     f"(global batch kept)")
    cfg.data.batch_size = micro_batch
    change = f"data.batch_size {b} -> {micro_batch}"
    if rule == "scale_lr":
        f = micro_batch / b
        o = cfg.optim
        change += f", optim.lr {o.lr:g} -> {o.lr * f:g} (x{f:.3f}, linear scaling)"
        o.lr, o.min_lr, o.warmup_lr = o.lr * f, o.min_lr * f, o.warmup_lr * f
    return cfg, change


def search(cfg: ExperimentConfig, *, device: torch.device, world_size: int,
           local_world_size: int = 1) -> AutobatchResult:
    """Build the configured model on ``device`` and find its micro-batch under ``autobatch.budget``."""
    budget = parse_budget(cfg.autobatch)
    if budget == "off":
        raise ConfigError("autobatch.budget: is off; set free, baseline or a number of GiB")
    dtype = DTYPES[cfg.train.precision]
    stage = int(build_ds_config(cfg, world_size).get("zero_optimization", {}).get("stage", 0))

    def built(model_cfg) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(model_cfg).to(device, dtype).train()

    model = built(cfg.model)
    states = model_state_bytes(model, cfg.train.precision, stage, world_size)
    if budget == "baseline":
        vision = getattr(cfg.model, "vision", None)
        if vision is None or not hasattr(vision, "reduction"):
            raise ConfigError(f"autobatch.budget=baseline: model {cfg.model.name!r} has no vision.reduction to turn off")
        baseline = built(replace(cfg.model, vision=replace(vision, reduction=ReductionConfig())))
        act = activation_meter(baseline, cfg, device, dtype)(cfg.data.batch_size)
        del baseline
        if act is None:
            raise ValueError(f"autobatch.budget=baseline: the unpruned model runs out of memory at "
                             f"data.batch_size={cfg.data.batch_size}")
        budget_bytes = states + act
    elif budget == "free":
        budget_bytes = int(free_memory_bytes(device, local_world_size) * (1 - cfg.autobatch.margin))
    else:
        budget_bytes = int(budget * GIB)
    result = find_micro_batch(activation_meter(model, cfg, device, dtype), budget_bytes, states,
                              cfg.data.batch_size, cfg.autobatch.max_batch, cfg.autobatch.probes)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def describe(result: AutobatchResult) -> str:
    return (f"micro-batch {result.micro_batch}: {result.bytes_per_sample / 2**20:.1f} MiB activations per sample "
            f"(+{result.fixed_bytes / 2**20:.1f} MiB fixed), model states {result.state_bytes / GIB:.3f} GiB, "
            f"budget {result.budget_bytes / GIB:.3f} GiB, {len(result.probes)} probes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train.autobatch",
                                     description="Find the largest micro-batch that fits autobatch.budget and print "
                                                 "the overrides that apply it (autobatch.rule).")
    parser.add_argument("--config", required=True, help="shipped config name or YAML path")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--world-size", type=int, default=1, help="data-parallel ranks the states are sharded over")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.autobatch.budget == "off":
            cfg.autobatch.budget = "free"
        device = pick_device(args.device)
        result = search(cfg, device=device, world_size=args.world_size)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    new_cfg, change = apply_rule(cfg, result.micro_batch)
    overrides = [f"data.batch_size={new_cfg.data.batch_size}", f"train.grad_accum={new_cfg.train.grad_accum}",
                 f"optim.lr={new_cfg.optim.lr:g}", f"optim.min_lr={new_cfg.optim.min_lr:g}",
                 f"optim.warmup_lr={new_cfg.optim.warmup_lr:g}"]
    if args.json:
        print(json.dumps({**result.to_dict(), "rule": cfg.autobatch.rule, "overrides": overrides}))
    else:
        print(f"{describe(result)}\n{cfg.autobatch.rule}: {change}\noverrides: {' '.join(overrides)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
