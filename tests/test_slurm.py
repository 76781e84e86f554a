"""launch/slurm/*.sbatch against a real one-node SLURM (tests/slurm/cluster.py starts it; the
packages are installed by tests/slurm/ensure_slurm.sh if missing). Run them alone with
``pytest -m slurm``; tests/test_slurm_nodes.py runs the same scripts on several nodes
(preemption and requeue, a lost node, evaluation across nodes).

The jobs run the tiny ALBEF+ELIP config on CPU: two tasks (ranks) on the node, GPU directives
overridden on the sbatch line (--gpus-per-node=0), a few steps of batch 4.
"""
import json
import shutil

import pytest

from pipeline.train import checkpoint as ckpt
from tests.helpers_slurm import TINY, job_env, read, scalars
from tests.helpers_train import repo_root
from tests.slurm.cluster import LocalSlurm

pytestmark = pytest.mark.slurm

REPO = repo_root()
CPU_JOB = ["--gpus-per-node=0", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=15:00"]


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


def test_pretrain_sbatch_runs_two_ranks_to_completion(slurm, shards, tmp_path):
    run = tmp_path / "run"
    job = slurm.sbatch(*CPU_JOB, f"--output={tmp_path}/slurm-%j.out", "launch/slurm/pretrain.sbatch",
                       "tiny_albef_elip", f"train.run_dir={run}", f"data.train_shards={shards}", *TINY,
                       "optim.max_steps=6", "train.log_every=2", env=job_env(), cwd=REPO)
    (rec,) = slurm.wait(job, timeout=240)
    log = read(run / "slurm" / f"{job}.log")
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", log[-5000:]
    assert rec["Restarts"] == "0"
    assert "2 ranks" in log and "finished at step 6/6" in log
    assert read(tmp_path / f"slurm-{job}.out").count("finished at step 6/6") == 1  # --output has it too
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    tag = ckpt.find_latest(run / "checkpoints")
    assert tag is not None and tag.name == "step00000006" and ckpt.is_complete(tag)
    assert {p.name for p in tag.glob("trainer_rank*.pt")} == {"trainer_rank00000.pt", "trainer_rank00001.pt"}
    logged = scalars(run)
    assert logged["train/loss"] == [2, 4, 6]
    assert logged["perf/samples_per_s_rank1"] == [2, 4, 6]  # a second rank trained


@pytest.mark.parametrize("where", ["repo", "path with spaces"])
def test_evlgen_sbatch_finds_pretrain_sbatch_and_checks_the_config(slurm, tmp_path, where):
    """The thin EVLGen variant sources pretrain.sbatch from where it was submitted (also from a
    path with spaces, with an argument that has one); a bad config fails at once with the
    config's error, before any rank starts."""
    launch = REPO / "launch" / "slurm"
    if where != "repo":
        launch = tmp_path / "my launch scripts" / "slurm"
        shutil.copytree(REPO / "launch" / "slurm", launch)
    run = tmp_path / "run dir"
    job = slurm.sbatch(*CPU_JOB, f"--output={tmp_path}/out-%j.txt", launch / "evlgen.sbatch",
                       "no_such_config", f"train.run_dir={run}", env=job_env(), cwd=REPO)
    (rec,) = slurm.wait(job, timeout=120)
    out = read(tmp_path / f"out-{job}.txt")
    assert rec["JobState"] == "FAILED", out
    assert "config error" in out and "no_such_config" in out and "pretrain.sbatch not found" not in out
    assert not run.exists()
