"""Process-group start under torchrun, the deepspeed launcher, srun, or a plain ``python``.

torchrun and the deepspeed launcher set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT. Under ``srun`` only SLURM_* are set: they are mapped to the torch names before
``deepspeed.init_distributed`` (which would otherwise look for mpi4py). A plain ``python``
process becomes a world of one.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_host(nodelist: str) -> str:
    """First host of a SLURM node list (``node[01-04,07],other`` -> ``node01``)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    m = re.match(r"^([^\[,]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def map_launcher_env(env: dict | None = None) -> dict:
    """Fill the torch.distributed variables from SLURM (srun) or for a single process; returns ``env``."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
        return env
    # SLURM_STEP_NUM_TASKS is set for the tasks of an srun step, not in the batch script itself
    # (where a plain python is one process even when the job has several tasks).
    ntasks = env.get("SLURM_STEP_NUM_TASKS")
    if "SLURM_PROCID" in env and ntasks:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = ntasks
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            env["MASTER_ADDR"] = _first_host(nodes) if nodes else "127.0.0.1"
        if "MASTER_PORT" not in env:
            job = int(env.get("SLURM_JOB_ID", "0") or 0)
            env["MASTER_PORT"] = str(15000 + job % 20000)
        return env
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return env


def setup_distributed() -> DistInfo:
    """Start the process group (NCCL on GPUs, gloo on CPU) and pick this rank's device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    map_launcher_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accel = get_accelerator()
    if accel.device_name() == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend)
