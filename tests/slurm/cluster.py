"""A real SLURM on one machine for the tests: munged, slurmctld and slurmd started as root from
a private temporary directory (its own munge key and socket, state, spool, logs and ports), so
nothing of a system SLURM or munge is used or touched. Only the processes started here are
stopped again.

One node (the default) is ``localhost``. With ``nodes=N > 1`` every node is a slurmd in its own
network, UTS and mount namespaces (netns.py): its own address on a private bridge, its own
hostname (``elipn1`` ...) and a hosts file naming every node (its own name on 127.0.1.1, as
Debian has it, which trips gloo: see pipeline/train/distributed.py), while slurmctld and munged stay in
the machine's namespace (the bridge holds the controller's address; munge's socket is a file,
which every node sees, as it sees the whole file system). Jobs run inside their node's
namespaces, so ranks on two nodes talk over the bridge as over a cluster's network.

Manual use (a cluster to try the sbatch scripts on; Ctrl-C stops it)::

    python -m tests.slurm.cluster [--nodes 2]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.slurm.netns import Network, Node

ENSURE = Path(__file__).with_name("ensure_slurm.sh")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return total_kb // 1024 // 2  # less than the machine has: slurmd drains a node that has less


def slurm_conf(root: Path, ctld_port: int, slurmd_port: int, cpus: int, mem_mb: int,
               controller: str = "localhost", nodes: list[tuple[str, str]] = (("localhost", "127.0.0.1"),),
               slurmd_timeout: int = 300) -> str:
    """A minimal slurm.conf: root daemons, no cgroups (containers). ``controller``: slurmctld's
    ``host`` or ``host(addr)``; ``nodes``: ``(name, address)`` of each slurmd; ``slurmd_timeout``:
    seconds after which a node that stops answering is DOWN (its jobs requeued or failed)."""
    node_lines = "\n".join(f"NodeName={name} NodeAddr={addr} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN"
                           for name, addr in nodes)
    return f"""\
ClusterName=elipci
SlurmctldHost={controller}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again this many seconds after the requeue (default 120)
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=10
SlurmdTimeout={slurmd_timeout}
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """Start with :meth:`start`, stop with :meth:`stop`; :attr:`env` has ``SLURM_CONF`` set.
    ``nodes``: how many slurmd (more than one: each in its own namespaces, see the module)."""

    def __init__(self, nodes: int = 1):
        if nodes < 1:
            raise ValueError(f"nodes must be at least 1, got {nodes}")
        self.num_nodes = nodes
        self.root: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.env: dict = {}
        self.net: Network | None = None
        self.nodes: list[Node] = []

    # ------------------------------------------------------------------ daemons

    def start(self, timeout: float = 60) -> "LocalSlurm":
        subprocess.run(["bash", str(ENSURE)], check=True)
        self.root = Path(tempfile.mkdtemp(prefix="elip-slurm-"))
        self.root.chmod(0o755)  # munged wants its socket's directories searchable by all
        for d in ("munge", "state", "spool"):
            (self.root / d).mkdir()
        (self.root / "munge").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        # the daemons live in /usr/sbin, which a non-login shell's PATH may lack
        path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        conf = self.root / "slurm.conf"
        self.env = {**os.environ, "PATH": path, "SLURM_CONF": str(conf)}
        try:
            if self.num_nodes == 1:
                controller, nodes, slurmd_timeout = "localhost", [("localhost", "127.0.0.1")], 300
            else:
                # slurmctld checks that its host's name is the configured controller's
                self.net = Network([f"elipn{i + 1}" for i in range(self.num_nodes)], socket.gethostname()).create()
                self.nodes = self.net.nodes
                for node in self.nodes:
                    (self.root / f"hosts-{node.name}").write_text(self.net.hosts_file(node))
                controller = f"{self.net.controller_name}({self.net.controller_addr})"
                nodes = [(n.name, n.addr) for n in self.nodes]
                slurmd_timeout = 20  # the lost-node test waits this long (default 300)
            # each node is given all CPUs and half the memory: jobs ask for less, and slurmd
            # drains a node that has less than its configured size
            conf.write_text(slurm_conf(self.root, _free_port(), _free_port(), os.cpu_count() or 1, _mem_mb(),
                                       controller=controller, nodes=nodes, slurmd_timeout=slurmd_timeout))
            m = self.root / "munge"
            self._spawn("munged", ["munged", "--foreground", f"--socket={m}/munge.socket", f"--key-file={key}",
                                   f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed",
                                   f"--log-file={m}/munged.log"])
            self._wait_for(lambda: (m / "munge.socket").exists(), timeout, "munged's socket")
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(conf)])
            if self.net is None:
                self._spawn("slurmd-localhost", ["slurmd", "-D", "-N", "localhost", "-f", str(conf)])
            for node in self.nodes:
                self.start_node(node.name, wait=False)
            self._wait_for(lambda: self.node_states() == ["idle"] * self.num_nodes, timeout,
                           f"{self.num_nodes} node(s) to register as idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} in this cluster (nodes: {[n.name for n in self.nodes]})")

    def start_node(self, name: str, wait: bool = True, timeout: float = 60) -> None:
        """(Re)start a node's slurmd in its namespaces; ``wait``: until slurmctld has it idle again."""
        node = self._node(name)
        (self.root / "spool" / name).mkdir(exist_ok=True)  # slurmd does not make its own
        self._spawn(f"slurmd-{name}", self.net.command(node, self.root / f"hosts-{name}", [
            shutil.which("slurmd", path=self.env["PATH"]) or "slurmd", "-D", "-N", name, "-f", self.env["SLURM_CONF"]]))
        if wait:
            self._wait_for(lambda: self.node_states([name]) == ["idle"], timeout, f"{name} to return as idle")

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL everything on a node (its slurmd, job steps and ranks), as if it lost power;
        returns the pids killed."""
        pids = self.net.kill_all(self._node(name))
        proc = self.procs.pop(f"slurmd-{name}", None)
        if proc is not None:
            proc.wait(10)
        return pids

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / f"{name}.out", "ab")
        exe = shutil.which(cmd[0], path=self.env["PATH"])
        if exe is None:
            raise FileNotFoundError(f"{cmd[0]} not found in {self.env['PATH']} (see {ENSURE.name})")
        self.procs[name] = subprocess.Popen([exe, *cmd[1:]], stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            stdin=subprocess.DEVNULL)
        out.close()

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not ready():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                                       + self.logs(name))
            if time.time() > deadline:
                raise TimeoutError(f"timed out waiting for {what}:\n" + self.logs())
            time.sleep(0.2)

    def node_states(self, names: list[str] | None = None) -> list[str]:
        """sinfo's state of each node (all, in order, by default); [] while slurmctld does not answer."""
        names = names or [n.name for n in self.nodes] or ["localhost"]
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            return []
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return [states.get(n, "unknown") for n in names]

    def logs(self, *names: str) -> str:
        names = names or tuple(self.procs)
        out = []
        for name in names:
            for path in (self.root / f"{name}.out", self.root / f"{name}.log"):
                if path.exists():
                    out.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel what is left of the jobs, then stop the daemons started here (and only them)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--signal=KILL", "--user", "root"], env=self.env,
                           capture_output=True, timeout=30)
        for name in [n for n in self.procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]:
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.net is not None:
            self.net.destroy()
            self.net = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    # ------------------------------------------------------------------ jobs

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | Path | None = None) -> str:
        """Submit; returns the job id."""
        r = subprocess.run(["sbatch", "--parsable", *map(str, args)], env={**(env or os.environ), **self._conf()},
                           cwd=cwd, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(map(str, args))} failed: {r.stderr}")
        return r.stdout.strip().split(";")[0]

    def _conf(self) -> dict:
        return {"SLURM_CONF": self.env["SLURM_CONF"]}

    def scontrol(self, *args: str) -> str:
        return subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True, timeout=30,
                              check=True).stdout

    def jobs(self, job_id: str) -> list[dict]:
        """``scontrol show job`` of a job (one record per array task) as ``{Key: value}`` dicts."""
        out = self.scontrol("show", "job", "-o", job_id)
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float) -> list[dict]:
        """Wait until every task of the job is in a terminal state; returns the records."""
        deadline = time.time() + timeout
        while True:
            records = self.jobs(job_id)
            if records and all(r["JobState"] in TERMINAL for r in records):
                return records
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} not done after {timeout} s: "
                                   f"{[(r.get('JobId'), r['JobState'], r.get('Reason')) for r in records]}\n"
                                   + self.logs())
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description="Start a test SLURM on this machine (root); Ctrl-C stops it.")
    parser.add_argument("--nodes", type=int, default=1, help="slurmd nodes (more than 1: network namespaces)")
    args = parser.parse_args()
    # SIGTERM (kill, timeout) stops the cluster as Ctrl-C does: no namespaces or daemons left
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cluster = LocalSlurm(args.nodes).start()
    for node in cluster.nodes:
        print(f"node {node.name}: {node.addr} (ip netns exec {node.netns} ... runs a command there)")
    print(f"export SLURM_CONF={cluster.env['SLURM_CONF']}   # then sbatch / squeue / scontrol; Ctrl-C stops it",
          flush=True)
    try:
        while all(p.poll() is None for p in cluster.procs.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
