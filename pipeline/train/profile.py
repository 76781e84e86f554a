"""Cost of one training step: FLOPs, activation bytes saved for backward, wall time, memory.

FLOPs (``torch.utils.flop_counter``) and saved bytes are deterministic, so they back claims on
any machine; wall time is only ever reported as a ratio measured side by side in one process.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class StepCost:
    flops: int
    activation_bytes: int


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


def measure_step(step: Callable[[], None], params: Iterable[torch.Tensor]) -> StepCost:
    """Run ``step`` (forward + backward) once, counting FLOPs and the bytes autograd saves.

    Saved tensors are counted once per storage; storages belonging to ``params`` (weights
    saved by linear layers, for instance) are excluded, so the number is the activations alone.
    """
    param_keys = {_storage_key(p) for p in params}
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            key = _storage_key(t)
            if key not in param_keys:
                seen[key] = t.untyped_storage().nbytes()
        return t

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return StepCost(flops=int(counter.get_total_flops()), activation_bytes=int(sum(seen.values())))


def timed_call(step: Callable[[], None]) -> float:
    """Seconds one ``step()`` takes, CUDA work included."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def median_wall(step: Callable[[], None], repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``step`` over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        step()
    return statistics.median(timed_call(step) for _ in range(repeats))


def peak_cuda_bytes(step: Callable[[], None]) -> int | None:
    """Peak CUDA memory allocated during ``step``, or None on CPU."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())
