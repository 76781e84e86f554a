"""launch/slurm/*.sbatch on a real three-node SLURM on one machine: every slurmd in its own
network, UTS and mount namespaces with its own address on a private bridge
(tests/slurm/cluster.py, netns.py), so a job's ranks on two nodes rendezvous by host name and
talk gloo over that network as on a cluster. Run them alone with ``pytest -m slurm``.

Jobs ask for two nodes of the three, one CPU rank on each (the third node lets a job requeued
after a node failure start again at once, on other nodes).
"""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from data_prep_fixtures import read_shards

from pipeline.train import checkpoint as ckpt
from tests.helpers_slurm import TINY, job_env, read, scalars
from tests.helpers_train import repo_root
from tests.slurm.cluster import LocalSlurm

pytestmark = pytest.mark.slurm

REPO = repo_root()
TWO_NODES = ["--gpus-per-node=0", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=15:00"]


@pytest.fixture(scope="module")
def slurm():
    cluster = LocalSlurm(nodes=3).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 training samples (2 ranks x batch 4: 8 steps per epoch) and a 24-image evaluation set."""
    from data_prep import synthetic

    root = tmp_path_factory.mktemp("slurm_nodes_data")
    synthetic.build(root / "train", 64, image_size=64, shard_size=16, min_shards=1)
    synthetic.build(root / "eval", 24, image_size=64, shard_size=12, min_shards=1, split="test")
    return root


def _pretrain(slurm, tmp_path, run: Path, shards: Path, *overrides: str) -> str:
    return slurm.sbatch(*TWO_NODES, f"--output={tmp_path}/slurm-%j.out", "launch/slurm/pretrain.sbatch",
                        "tiny_albef_elip", f"train.run_dir={run}", f"data.train_shards={shards / 'train'}", *TINY,
                        *overrides, env=job_env(), cwd=REPO)


def _hosts(slurm, nodelist: str) -> list[str]:
    return slurm.scontrol("show", "hostnames", nodelist).split()


def _wait_for_log(slurm, job: str, path: Path, pattern: str, timeout: float) -> re.Match:
    deadline = time.time() + timeout
    while not (m := re.search(pattern, read(path))):
        assert slurm.jobs(job)[0]["JobState"] in ("PENDING", "RUNNING"), read(path)[-4000:]
        assert time.time() < deadline, f"{pattern!r} never appeared in {path}:\n{read(path)[-4000:]}"
        time.sleep(0.2)
    return m


def test_two_nodes_train_and_evaluate_as_on_one(slurm, shards, tmp_path):
    """Two ranks on two nodes train to the end; the retrieval evaluation they run together
    (each re-ranks its rows) scores exactly what one process scores on the same checkpoint."""
    run = tmp_path / "run"
    job = _pretrain(slurm, tmp_path, run, shards, "optim.max_steps=12", "train.log_every=2",
                    "eval.every=12", f"eval.shards={shards / 'eval'}")
    (rec,) = slurm.wait(job, timeout=300)
    log = read(run / "slurm" / f"{job}.log")
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", log[-5000:]
    hosts = _hosts(slurm, rec["NodeList"])
    assert len(set(hosts)) == 2 and rec["BatchHost"] == hosts[0], rec
    assert f"rendezvous {hosts[0]}:" in log  # the first node by name, as the other node resolves it
    assert "2 ranks" in log and "finished at step 12/12" in log
    tag = ckpt.find_latest(run / "checkpoints")
    assert tag.name == "step00000012" and ckpt.is_complete(tag)
    assert {p.name for p in tag.glob("trainer_rank*.pt")} == {"trainer_rank00000.pt", "trainer_rank00001.pt"}
    assert scalars(run)["perf/samples_per_s_rank1"] == [2, 4, 6, 8, 10, 12]  # the second node's rank trained

    (two_nodes,) = [json.loads(line) for line in (run / "eval_history.jsonl").read_text().splitlines()]
    r = subprocess.run([sys.executable, "-m", "pipeline.eval", "retrieval", "--run", str(run), "--out",
                        str(tmp_path / "one.json")], cwd=REPO, env=job_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["step"] == two_nodes["step"] == 12 and one["num_images"] == 24
    keys = [k for k, v in two_nodes.items() if isinstance(v, float)]
    assert "txt_r1" in keys and "img_r5" in keys
    assert {k: round(two_nodes[k], 6) for k in keys} == {k: round(one[k], 6) for k in keys}


def test_usr1_on_two_nodes_checkpoints_both_ranks_requeues_and_resumes(slurm, shards, tmp_path):
    run, total = tmp_path / "run", 20
    job = _pretrain(slurm, tmp_path, run, shards, f"optim.max_steps={total}", "train.log_every=1",
                    "train.resume=none")  # for the first run only: a requeued one resumes regardless
    _wait_for_log(slurm, job, run / "train.log", r"step 2/", timeout=240)
    first_nodes = slurm.jobs(job)[0]["NodeList"]
    # what Slurm does 120 s before the time limit (--signal=B:USR1@120): USR1 to the batch shell,
    # which srun forwards to the rank on the other node too
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm.env, check=True)
    (rec,) = slurm.wait(job, timeout=300)
    log = read(run / "slurm" / f"{job}.log")
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", log[-6000:]
    assert rec["Restarts"] == "1", log[-6000:]
    assert len(_hosts(slurm, first_nodes)) == len(_hosts(slurm, rec["NodeList"])) == 2

    stopped = re.search(rf"preempted at step (\d+)/{total}", log)
    assert stopped, log[-6000:]
    step = int(stopped.group(1))
    assert 2 <= step < total
    preempted = run / "checkpoints" / f"step{step:08d}"
    assert ckpt.is_complete(preempted)  # both ranks wrote their part before the requeue
    assert {p.name for p in preempted.glob("trainer_rank*.pt")} == {"trainer_rank00000.pt", "trainer_rank00001.pt"}
    assert f"requeueing job {job}" in log and f"job {job} (restart 1)" in log
    resumed = re.search(r"resumed from (\S+) at step (\d+)", log)
    assert resumed and int(resumed.group(2)) == step and resumed.group(1).endswith(f"step{step:08d}")
    assert log.index("preempted at step") < log.index("resumed from") < log.index(f"finished at step {total}/{total}")
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == total
    assert scalars(run)["train/loss"] == list(range(1, total + 1))  # every step logged once across both runs


def test_a_node_lost_mid_run_ends_the_job_and_the_rerun_resumes(slurm, shards, tmp_path):
    """Everything on the second node (its slurmd, job step and rank) is killed mid-run: the job
    does not hang; it is requeued onto the nodes left, or fails and is submitted again, and
    either way resumes from the last checkpoint written before the loss."""
    run, total = tmp_path / "run", 60
    overrides = (f"optim.max_steps={total}", "train.log_every=1", "train.checkpoint_every=4")
    job = _pretrain(slurm, tmp_path, run, shards, *overrides)
    _wait_for_log(slurm, job, run / "train.log", r"checkpoint \S+step00000004 written", timeout=240)
    rec = slurm.jobs(job)[0]
    lost = _hosts(slurm, rec["NodeList"])[1]  # the batch script and rank 0 run on the first
    assert slurm.kill_node(lost), f"nothing ran on {lost}"
    saved_before = ckpt.find_latest(run / "checkpoints")
    try:
        # the loss shows within SlurmdTimeout (20 s) for slurmctld, at the next collective for rank 0
        deadline = time.time() + 240
        while True:
            rec = slurm.jobs(job)[0]
            if rec["JobState"] in ("FAILED", "NODE_FAIL", "CANCELLED") or rec["Restarts"] != "0":
                break
            assert time.time() < deadline, f"job {job} still {rec['JobState']} after losing {lost}:\n" \
                + read(run / "slurm" / f"{job}.log")[-4000:]
            time.sleep(0.5)
        requeued = rec["Restarts"] != "0"
        if not requeued:  # failed cleanly: the user submits the same command again
            job = _pretrain(slurm, tmp_path, run, shards, *overrides)
        (rec,) = slurm.wait(job, timeout=400)
    finally:
        slurm.start_node(lost)
    log = read(run / "slurm" / f"{job}.log")
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", log[-6000:]
    assert lost not in _hosts(slurm, rec["NodeList"])  # the lost node was down while the job ran again
    resumed = re.findall(r"resumed from \S+step(\d+) at step (\d+)", log)
    assert resumed, log[-6000:]
    step = int(resumed[-1][1])
    assert saved_before is not None and step >= int(saved_before.name[4:]) >= 4
    assert f"finished at step {total}/{total}" in log
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert slurm.node_states([lost]) == ["idle"]


def test_data_prep_array_on_several_nodes_writes_every_shard_and_the_manifest_once(slurm, tmp_path):
    out = tmp_path / "shards"
    # a task takes a whole node (all its CPUs), so the tasks run on different nodes at once
    job = slurm.sbatch("--array=0-3", f"--cpus-per-task={_node_cpus(slurm)}", f"--output={tmp_path}/dp-%A_%a.out",
                       "launch/slurm/data_prep.sbatch", "synthetic", "--num", "30", "--image-size", "32",
                       "--shard-size", "4", "--min-shards", "1", "--out", out, env=job_env(), cwd=REPO)
    records = slurm.wait(job, timeout=240)
    logs = {p.name: read(p) for p in sorted(tmp_path.glob("dp-*.out"))}
    every = "\n".join(logs.values())
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1", "2", "3"], every
    assert all(r["JobState"] == "COMPLETED" for r in records), every
    assert len({r["BatchHost"] for r in records}) >= 2, [r["BatchHost"] for r in records]
    for i in range(4):
        assert f"--part {i}/4" in every
    # every task but the one that wrote the manifest says how far the others were
    waiting = [name for name, text in logs.items() if "the last part to finish writes manifest.json" in text]
    assert len(waiting) == 3, every
    m = json.loads((out / "manifest.json").read_text())
    assert m["sources"]["synthetic"]["complete"] and m["num_samples"] == 30 and m["num_shards"] == 8
    assert sorted(read_shards(out)) == [f"synthetic-{i:09d}" for i in range(30)]


def _node_cpus(slurm) -> int:
    return int(re.search(r"CPUTot=(\d+)", slurm.scontrol("show", "node", slurm.nodes[0].name)).group(1))


def test_gloo_binds_the_cluster_interface_only_when_the_hostname_is_loopback(slurm, monkeypatch):
    from pipeline.train import distributed

    bridge = slurm.net.controller_addr  # an address of this machine, on the bridge the cluster made
    world = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "SLURM_LAUNCH_NODE_IPADDR": bridge}
    monkeypatch.setattr(distributed.socket, "gethostname", lambda: "localhost")
    assert distributed.gloo_interface(world) == slurm.net.bridge
    assert distributed.gloo_interface({**world, "SLURM_LAUNCH_NODE_IPADDR": "", "MASTER_ADDR": bridge}) == \
        slurm.net.bridge  # torchrun: towards the master
    assert distributed.gloo_interface({**world, "GLOO_SOCKET_IFNAME": "eth7"}) is None  # the user's choice
    assert distributed.gloo_interface({**world, "WORLD_SIZE": "1"}) is None
    assert distributed.gloo_interface({**world, "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1"}) is None  # all local
    monkeypatch.setattr(distributed.socket, "gethostname", lambda: bridge)  # a name that resolves off loopback
    assert distributed.gloo_interface(world) is None
