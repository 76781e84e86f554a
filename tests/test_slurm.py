"""launch/slurm/*.sbatch against a real one-node SLURM (tests/slurm/cluster.py starts it; the
packages are installed by tests/slurm/ensure_slurm.sh if missing), and a two-node torchrun
rendezvous on one machine. Run them alone with ``pytest -m slurm``.

The jobs run the tiny ALBEF+ELIP config on CPU: two tasks (ranks) each, GPU directives
overridden on the sbatch line (--gpus-per-node=0), a few steps of batch 4.
"""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from data_prep_fixtures import read_shards

from pipeline.train import checkpoint as ckpt
from tests.helpers_train import repo_root, subprocess_env, toy_config_dict
from tests.slurm.cluster import LocalSlurm

pytestmark = pytest.mark.slurm

REPO = repo_root()
CPU_JOB = ["--gpus-per-node=0", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=15:00"]
TINY = ["data.batch_size=4", "data.workers=0", "optim.warmup_steps=1", "train.checkpoint_every=0",
        "train.image_grid_every=0", "model.queue_size=16"]


@pytest.fixture(scope="module")
def slurm():
    cluster = LocalSlurm().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from data_prep import synthetic

    out = tmp_path_factory.mktemp("slurm_data") / "synthetic"
    # 64 samples: 2 ranks x batch 4 -> 8 steps per epoch
    synthetic.build(out, 64, image_size=64, shard_size=16, min_shards=1)
    return out


def _job_env() -> dict:
    # the job inherits this environment from sbatch: the worktree's package, the CPU accelerator,
    # HOME (DeepSpeed's compiled CPU op in ~/.cache/torch_extensions)
    return subprocess_env()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} does not exist)"


def _scalars(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_pretrain_sbatch_runs_two_ranks_to_completion(slurm, shards, tmp_path):
    run = tmp_path / "run"
    job = slurm.sbatch(*CPU_JOB, f"--output={tmp_path}/slurm-%j.out", "launch/slurm/pretrain.sbatch",
                       "tiny_albef_elip", f"train.run_dir={run}", f"data.train_shards={shards}", *TINY,
                       "optim.max_steps=6", "train.log_every=2", env=_job_env(), cwd=REPO)
    (rec,) = slurm.wait(job, timeout=240)
    log = _read(run / "slurm" / f"{job}.log")
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", log[-5000:]
    assert rec["Restarts"] == "0"
    assert "2 ranks" in log and "finished at step 6/6" in log
    assert _read(tmp_path / f"slurm-{job}.out").count("finished at step 6/6") == 1  # --output has it too
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    tag = ckpt.find_latest(run / "checkpoints")
    assert tag is not None and tag.name == "step00000006" and ckpt.is_complete(tag)
    assert {p.name for p in tag.glob("trainer_rank*.pt")} == {"trainer_rank00000.pt", "trainer_rank00001.pt"}
    scalars = _scalars(run)
    assert scalars["train/loss"] == [2, 4, 6]
    assert scalars["perf/samples_per_s_rank1"] == [2, 4, 6]  # a second rank trained


def test_usr1_checkpoints_requeues_and_resumes(slurm, shards, tmp_path):
    run, total = tmp_path / "run", 20
    job = slurm.sbatch(*CPU_JOB, f"--output={tmp_path}/slurm-%j.out", "launch/slurm/pretrain.sbatch",
                       "tiny_albef_elip", f"train.run_dir={run}", f"data.train_shards={shards}", *TINY,
                       f"optim.max_steps={total}", "train.log_every=1",
                       "train.resume=none",  # for the first run only: a requeued one resumes regardless
                       env=_job_env(), cwd=REPO)
    deadline = time.time() + 180
    while "step 2/" not in _read(run / "train.log"):
        assert slurm.jobs(job)[0]["JobState"] in ("PENDING", "RUNNING"), _read(tmp_path / f"slurm-{job}.out")
        assert time.time() < deadline, "the job never reached step 2"
        time.sleep(0.2)
    # what Slurm does 120 s before the time limit (--signal=B:USR1@120): USR1 to the batch shell
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm.env, check=True)
    (rec,) = slurm.wait(job, timeout=300)
    log = _read(run / "slurm" / f"{job}.log")
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", log[-6000:]
    assert rec["Restarts"] == "1", log[-6000:]

    stopped = re.search(rf"preempted at step (\d+)/{total}", log)
    assert stopped, log[-6000:]
    step = int(stopped.group(1))
    assert 2 <= step < total
    assert "USR1: the ranks checkpoint" in log and f"requeueing job {job}" in log
    assert f"job {job} (restart 1)" in log
    resumed = re.search(r"resumed from (\S+) at step (\d+)", log)
    assert resumed and int(resumed.group(2)) == step and resumed.group(1).endswith(f"step{step:08d}")
    assert log.index("preempted at step") < log.index("resumed from") < log.index(f"finished at step {total}/{total}")
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == total
    assert [t.name for t in ckpt.complete_tags(run / "checkpoints")] == [f"step{step:08d}", f"step{total:08d}"]
    assert _scalars(run)["train/loss"] == list(range(1, total + 1))  # every step logged once across both runs


def test_evlgen_sbatch_finds_pretrain_sbatch_and_checks_the_config(slurm, tmp_path):
    """The thin EVLGen variant sources pretrain.sbatch from where it was submitted; a bad config
    fails at once with the config's error, before any rank starts."""
    job = slurm.sbatch(*CPU_JOB, f"--output={tmp_path}/out-%j.txt", "launch/slurm/evlgen.sbatch",
                       "no_such_config", f"train.run_dir={tmp_path / 'run'}", env=_job_env(), cwd=REPO)
    (rec,) = slurm.wait(job, timeout=120)
    out = _read(tmp_path / f"out-{job}.txt")
    assert rec["JobState"] == "FAILED", out
    assert "config error" in out and "no_such_config" in out and "pretrain.sbatch not found" not in out
    assert not (tmp_path / "run").exists()


def test_data_prep_job_array_writes_every_sample_once(slurm, tmp_path):
    out = tmp_path / "shards"
    job = slurm.sbatch("--array=0-2", "--cpus-per-task=1", f"--output={tmp_path}/dp-%A_%a.out",
                       "launch/slurm/data_prep.sbatch", "synthetic", "--num", "30", "--image-size", "32",
                       "--shard-size", "4", "--min-shards", "1", "--out", out, env=_job_env(), cwd=REPO)
    records = slurm.wait(job, timeout=180)
    logs = "\n".join(_read(p) for p in sorted(tmp_path.glob("dp-*.out")))
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1", "2"], logs
    assert all(r["JobState"] == "COMPLETED" for r in records), logs
    for i in range(3):
        assert f"--part {i}/3" in logs
    m = json.loads((out / "manifest.json").read_text())
    assert m["sources"]["synthetic"]["complete"] and m["num_samples"] == 30 and m["num_shards"] == 8
    assert sorted(read_shards(out)) == [f"synthetic-{i:09d}" for i in range(30)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_nodes_rendezvous_on_one_machine(shards, tmp_path):
    """Two 'nodes' (torchrun --nnodes 2, node ranks 0 and 1, one process each) meet at one
    master address and train as one world of 2 (the toy model: the rendezvous is the point)."""
    run, port = tmp_path / "run", _free_port()
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(toy_config_dict(str(run), str(shards), train={"image_grid_every": 0},
                                                     optim={"max_steps": 3})))
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "pipeline.train", "--config", str(config)]
        log = open(tmp_path / f"node{node_rank}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT))
        log.close()
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [_read(tmp_path / f"node{i}.log") for i in (0, 1)]
    assert codes == [0, 0], "\n".join(x[-4000:] for x in logs)
    assert re.search(r"\[rank0\] .*model toy: .*; 2 ranks, cpu", logs[0])  # the world size rank 0 saw
    assert "finished at step 3/3" in logs[0]
    assert json.loads((run / "status.json").read_text()) | {"time": 0} == \
        {"state": "finished", "step": 3, "total_steps": 3, "time": 0}
    assert _scalars(run)["perf/samples_per_s_rank1"] == [1, 2, 3]  # the other node's rank trained too
