"""A real one-node SLURM on localhost for the tests: munged, slurmctld and slurmd started as
root from a private temporary directory (its own munge key and socket, state, spool, logs and
ports), so nothing of a system SLURM or munge is used or touched. Only the processes started
here are stopped again.

Manual use (a cluster to try the sbatch scripts on; Ctrl-C stops it)::

    python -m tests.slurm.cluster
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

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


def slurm_conf(root: Path, ctld_port: int, slurmd_port: int, cpus: int, mem_mb: int) -> str:
    """A minimal slurm.conf: one node 'localhost', root daemons, no cgroups (containers)."""
    return f"""\
ClusterName=elipci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again this many seconds after the requeue (default 120)
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
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
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """Start with :meth:`start`, stop with :meth:`stop`; :attr:`env` has ``SLURM_CONF`` set."""

    def __init__(self):
        self.root: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.env: dict = {}

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
        conf = self.root / "slurm.conf"
        conf.write_text(slurm_conf(self.root, _free_port(), _free_port(), os.cpu_count() or 1, _mem_mb()))
        # the daemons live in /usr/sbin, which a non-login shell's PATH may lack
        path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        self.env = {**os.environ, "PATH": path, "SLURM_CONF": str(conf)}
        try:
            m = self.root / "munge"
            self._spawn("munged", ["munged", "--foreground", f"--socket={m}/munge.socket", f"--key-file={key}",
                                   f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed",
                                   f"--log-file={m}/munged.log"])
            self._wait_for(lambda: (m / "munge.socket").exists(), timeout, "munged's socket")
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(conf)])
            self._wait_for(self._node_idle, timeout, "the node to register as idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / f"{name}.out", "wb")
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

    def _node_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return r.returncode == 0 and r.stdout.strip() == "idle"

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
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
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
                                   + self.logs("slurmctld", "slurmd"))
            time.sleep(0.5)


def main() -> None:
    cluster = LocalSlurm().start()
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
