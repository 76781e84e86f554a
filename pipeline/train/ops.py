"""Say so before DeepSpeed JIT-compiles a C++ op on a first start.

DeepSpeed builds its ops with ninja the first time a process needs them and caches the result
under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); it prints nothing while
it compiles, so a first start looks hung for minutes (CPU Adam ~4.5 min on 2 cores).
"""
from __future__ import annotations

import os
import sys

# op name -> (what it is for, rough first-build seconds on 2 CPU cores)
KNOWN_OPS = {
    "deepspeed_shm_comm": ("shared-memory collectives for CPU ranks", 80),
    "cpu_adam": ("CPU Adam for ZeRO-Offload", 270),
}


def ops_to_build(offload_optimizer: bool) -> list[str]:
    """The ops this start will compile: needed by the run, neither installed prebuilt nor
    already in the JIT cache. The shared-memory op is built by ``deepspeed.init_distributed``
    wherever the accelerator offers it (CPU ranks), CPU Adam when the optimizer is offloaded."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    accelerator = get_accelerator()
    names = []
    shm = accelerator.create_op_builder("ShareMemCommBuilder")
    if shm is not None and deepspeed.ops.__compatible_ops__.get(shm.NAME, False):
        names.append(shm.NAME)
    if offload_optimizer:
        names.append(accelerator.create_op_builder("CPUAdamBuilder").NAME)
    return [n for n in names if not installed_ops.get(n, False) and not _cached(n)]


def _cached(name: str) -> bool:
    from torch.utils.cpp_extension import _get_build_directory

    return os.path.isfile(os.path.join(_get_build_directory(name, verbose=False), f"{name}.so"))


def announce_op_builds(offload_optimizer: bool, stream=sys.stderr) -> list[str]:
    """Print one line naming the ops about to be compiled and roughly how long it takes (on
    each node's local rank 0: the build and its cache are per machine). Returns the names."""
    names = ops_to_build(offload_optimizer)
    local_rank = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if names and local_rank == "0":
        from torch.utils.cpp_extension import _get_build_directory

        seconds = sum(KNOWN_OPS.get(n, ("", 120))[1] for n in names)
        took = f"{seconds} s" if seconds < 90 else f"{seconds / 60:.1f} min"
        what = ", ".join(f"{n} ({KNOWN_OPS[n][0]})" if n in KNOWN_OPS else n for n in names)
        cache = os.path.dirname(_get_build_directory(names[0], verbose=False))
        print(f"first start: DeepSpeed compiles {what}, about {took} on 2 CPU cores (less with more); "
              f"once, cached in {cache}", file=stream, flush=True)
    return names
