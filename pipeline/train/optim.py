"""AdamW parameter groups, the warm-up + cosine schedule, and the DeepSpeed JSON filled in."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipeline.config import ConfigError, ExperimentConfig
from pipeline.models.contracts import LayerwiseLR, NoWeightDecay

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: decayed weights, and biases / norms / 1-d
    parameters / the model's ``no_weight_decay()`` names (timm convention) without decay.

    A :class:`~pipeline.models.contracts.LayerwiseLR` model (``lr_scales() -> {name prefix:
    multiplier}``, METER's 5x for its cross-modal layers) gets those parameters in further groups
    carrying an ``lr_scale``."""
    skip = set(model.no_weight_decay()) if isinstance(model, NoWeightDecay) else set()
    scales = model.lr_scales() if isinstance(model, LayerwiseLR) else {}
    buckets: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = not (p.ndim <= 1 or name.endswith(".bias") or any(name == k or name.endswith("." + k) for k in skip))
        scale = next((s for prefix, s in scales.items() if name.startswith(prefix)), 1.0)
        buckets.setdefault((decayed, scale), []).append(p)
    groups = []
    for scale in sorted({s for _, s in buckets}):
        for decayed in (True, False):
            if buckets.get((decayed, scale)):
                group = {"params": buckets[(decayed, scale)], "weight_decay": weight_decay if decayed else 0.0}
                if scale != 1.0:
                    group["lr_scale"] = scale
                groups.append(group)
    return groups


class WarmupCosine:
    """LR multiplier for ``LambdaLR``: linear warm-up from ``warmup_lr`` to ``lr`` over
    ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` at ``total_steps``."""

    def __init__(self, lr: float, min_lr: float, warmup_lr: float, warmup_steps: int, total_steps: int):
        self.lr, self.min_lr, self.warmup_lr = lr, min_lr, warmup_lr
        self.warmup_steps, self.total_steps = warmup_steps, max(1, total_steps)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.lr_at(step) / self.lr if self.lr > 0 else 0.0


def warmup_steps(cfg: ExperimentConfig, total_steps: int) -> int:
    o = cfg.optim
    if o.warmup_steps and o.warmup_fraction:
        raise ConfigError("optim.warmup_fraction: set either optim.warmup_steps or optim.warmup_fraction, not both")
    if o.warmup_fraction:
        return int(round(o.warmup_fraction * total_steps))
    return o.warmup_steps


def build_optimizer(model: nn.Module, cfg: ExperimentConfig, offload: bool):
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    for group in groups:  # the schedule multiplies every group's own initial lr alike
        group["lr"] = o.lr * group.pop("lr_scale", 1.0)
    if offload:  # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's CPU Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                adamw_mode=True)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def build_scheduler(optimizer, cfg: ExperimentConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    o = cfg.optim
    fn = WarmupCosine(o.lr, o.min_lr, o.warmup_lr, warmup_steps(cfg, total_steps), total_steps)

    # A plain function, so LambdaLR's state_dict (checkpointed by DeepSpeed) holds the step count
    # only: a resumed run follows the schedule of its own config (e.g. more epochs).
    def lr_lambda(step: int) -> float:
        return fn(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def ds_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".json":
        if not p.is_file():
            raise ConfigError(f"train.deepspeed: no such file {name_or_path!r}")
        return p
    for root in (Path.cwd() / "ds_configs", DS_CONFIG_DIR):
        candidate = root / f"{name_or_path}.json"
        if candidate.is_file():
            return candidate
    known = sorted(x.stem for x in DS_CONFIG_DIR.glob("*.json"))
    raise ConfigError(f"train.deepspeed: no DeepSpeed config {name_or_path!r} in ds_configs/ (known: {known})")


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _find_auto(v, f"{prefix}.{key}" if prefix else key)]
    return [prefix] if node == "auto" else []


def build_ds_config(cfg: ExperimentConfig, world_size: int) -> dict:
    """The DeepSpeed JSON named by ``train.deepspeed`` with its "auto" values filled from the
    experiment config: batch sizes, accumulation, clipping, and the precision block."""
    t = cfg.train
    path = ds_config_path(t.deepspeed)
    ds = copy.deepcopy(json.loads(path.read_text()))
    micro, accum = cfg.data.batch_size, t.grad_accum
    if accum < 1:
        raise ConfigError(f"train.grad_accum: must be >= 1, got {accum}")
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = micro * accum * world_size
    ds["gradient_clipping"] = float(t.grad_clip)
    for block in ("bf16", "fp16"):
        ds.setdefault(block, {})
        ds[block]["enabled"] = t.precision == block
    ds.pop("bfloat16", None)
    left = _find_auto(ds)
    if left:
        raise ConfigError(f"train.deepspeed: {path} has 'auto' values the trainer does not fill: {left}")
    return ds


def check_precision(precision: str, accelerator=None) -> None:
    """Refuse a precision the accelerator cannot run, before any model is built: fp16 on a CPU
    without fp16 kernels, bf16 on a GPU older than Ampere. ``accelerator``: DeepSpeed's."""
    if precision == "fp32":
        return
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    supported = accelerator.is_fp16_supported() if precision == "fp16" else accelerator.is_bf16_supported()
    if not supported:
        other = "bf16 or fp32" if precision == "fp16" else "fp16 or fp32"
        raise ConfigError(f"train.precision={precision}: the {accelerator.device_name()} accelerator here has no "
                          f"{precision} support; use {other}")


def offloads_optimizer(ds: dict) -> bool:
    off = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device", "none") not in ("none", None)
