"""Process-group start under torchrun, the deepspeed launcher, srun, or a plain ``python``.

torchrun and the deepspeed launcher set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT. Under ``srun`` only SLURM_* are set: they are mapped to the torch names before
``deepspeed.init_distributed`` (which would otherwise look for mpi4py). A plain ``python``
process becomes a world of one.

gloo (CPU) binds each rank to the address its host's name resolves to; where that is a
loopback address (Debian's ``127.0.1.1 HOSTNAME`` line in /etc/hosts) ranks on other nodes
cannot connect, so the rank binds the interface it reaches the launching node through instead.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
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


def _is_loopback(host: str) -> bool:
    """Whether ``host`` resolves to a loopback address (an unresolvable one counts: gloo then
    falls back to loopback too)."""
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return True


def _interface_towards(addr: str) -> str | None:
    """The network interface holding the local address this host uses to reach ``addr``
    (a UDP ``connect`` picks the route and sends nothing)."""
    import psutil

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((addr, 9))
        local = s.getsockname()[0]
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addrs):
            return name
    return None


def gloo_interface(env: dict) -> str | None:
    """The interface gloo must bind (``GLOO_SOCKET_IFNAME``), or None to leave gloo's choice.

    Only needed when the world has several ranks, this host's name resolves to a loopback
    address and the user set nothing. The interface is the one towards the node that launched
    the ranks (``SLURM_LAUNCH_NODE_IPADDR``, the address the other nodes reached it at) or
    towards ``MASTER_ADDR``; on that node itself the route to its own address names its
    cluster interface too.
    """
    if env.get("GLOO_SOCKET_IFNAME") or int(env.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not _is_loopback(socket.gethostname()):
        return None
    for target in (env.get("SLURM_LAUNCH_NODE_IPADDR"), env.get("MASTER_ADDR")):
        if not target:
            continue
        try:
            addr = socket.gethostbyname(target)
        except OSError:
            continue
        if ipaddress.ip_address(addr).is_loopback:
            continue
        name = _interface_towards(addr)
        if name is not None:
            return name
    return None


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
        interface = gloo_interface(os.environ)
        if interface is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
            # printed, not logged: logging is set up once the rank is known, after this
            print(f"[rank{rank}] gloo binds {interface}: this host's name {socket.gethostname()} resolves to a "
                  "loopback address (set GLOO_SOCKET_IFNAME to choose another)", file=sys.stderr, flush=True)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend)
