"""The trainer: two-rank DeepSpeed runs (ZeRO-2, ZeRO-3), exact resume, signals, TensorBoard,
checkpoints that are never picked up half-written, launcher environments."""
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import load_config
from pipeline.models import weights
from pipeline.train import checkpoint as ckpt
from pipeline.train.distributed import map_launcher_env
from tests.helpers_train import ToyConfig, ToyModel, repo_root, subprocess_env, toy_config_dict, write_shards

EXPECTED_SCALARS = {
    "train/loss", "train/loss_i2t", "train/loss_t2i", "train/lr", "train/grad_norm", "train/epoch",
    "perf/samples_per_s", "perf/samples_per_s_rank0", "perf/samples_per_s_rank1", "perf/data_time_fraction",
    "data/skipped_samples", "mem/peak_rss_gb", "tokens/layer_00", "tokens/layer_01", "reduction/progress",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(config: Path, *overrides: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", "-m", "pipeline.train", "--config", str(config), *overrides]
    r = subprocess.run(cmd, cwd=repo_root(), env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-8000:]}"
    return r


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("start", [0, 2])
def test_a_rerun_logs_each_step_once(tmp_path, start):
    """Killed after logging steps 1..4 (with a checkpoint at ``start``, or before the first one),
    the rerun logs from ``start + 1``: TensorBoard and metrics.jsonl hold each step once."""
    from pipeline.train.monitor import Monitor

    first = Monitor(tmp_path, 0, True)
    for step in range(1, 5):
        first.scalars(step, {"train/loss": 10.0 + step})
    first.flush()  # no close: the process was killed
    second = Monitor(tmp_path, start, True)
    for step in range(start + 1, 7):
        second.scalars(step, {"train/loss": float(step)})
    second.close()
    expected = [10.0 + s for s in range(1, start + 1)] + [float(s) for s in range(start + 1, 7)]
    assert [(e.step, e.value) for e in tensorboard(tmp_path).Scalars("train/loss")] == list(zip(range(1, 7), expected))
    assert [(m["step"], m["train/loss"]) for m in metrics(tmp_path)] == list(zip(range(1, 7), expected))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    # 48 samples, one corrupt; 2 ranks x batch 4 -> 6 steps per epoch
    write_shards(root / "shards", shards=4, per_shard=12, corrupt_keys=("001003",))

    def config(name: str, **sections) -> Path:
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(toy_config_dict(str(root / name), str(root / "shards"), **sections)))
        return path

    return root, config


@pytest.mark.slow
def test_zero2_two_ranks_resume_equals_straight_run(setup):
    root, config = setup
    straight = config("straight", train={"checkpoint_every": 4})
    torchrun(straight)
    stopped = config("resumed")
    r = torchrun(stopped, "train.stop_at_step=5")  # mid-epoch 0
    assert json.loads((root / "resumed" / "status.json").read_text())["state"] == "stopped"
    assert ckpt.find_latest(root / "resumed" / "checkpoints").name == "step00000005"
    r = torchrun(stopped)  # resume=latest -> runs on to the end (2 epochs = 12 steps)
    assert "resumed from" in r.stderr and "at step 5" in r.stderr

    a, b = metrics(root / "straight"), metrics(root / "resumed")
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 13))
    for x, y in zip(a, b):
        for key in ("train/loss", "train/loss_i2t", "train/loss_t2i", "train/lr", "train/grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    assert a[-1]["train/loss"] < a[0]["train/loss"]  # it learns
    assert a[-1]["data/skipped_samples"] >= 1  # the corrupt JPEG was skipped, counted, training went on

    sa = weights.consolidated_state_dict(ckpt.find_latest(root / "straight" / "checkpoints"))
    sb = weights.consolidated_state_dict(ckpt.find_latest(root / "resumed" / "checkpoints"))
    assert sa.keys() == sb.keys() and "patch.weight" in sa and "frozen.weight" not in sa  # frozen excluded
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6)

    # TensorBoard: every expected tag, kept-patch images, and no overlapping curves after the resume
    acc = tensorboard(root / "resumed")
    assert EXPECTED_SCALARS <= set(acc.Tags()["scalars"])
    assert "tokens/kept_patches" in acc.Tags()["images"]
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))
    assert acc.Scalars("tokens/layer_01")[-1].value == 8  # 16 patches, half kept
    # FollowsProgress: the value set before the step that ends at each log line
    assert [round(e.value * 12) for e in acc.Scalars("reduction/progress")] == list(range(12))

    # the run directory: resolved config, status, newest complete checkpoint reloadable for evaluation
    run = root / "resumed"
    assert load_config(run / "config.yaml").train.run_dir == str(run)
    assert json.loads((run / "status.json").read_text()) | {"time": 0} == {
        "state": "finished", "step": 12, "time": 0, "total_steps": 12}
    model = ToyModel(ToyConfig())
    tag = weights.load_weights(model, run)
    assert tag.name == "step00000012"
    torch.testing.assert_close(model.patch.weight, sa["patch.weight"])
    kept = [d.name for d in (root / "straight" / "checkpoints").iterdir() if d.is_dir()]
    assert sorted(kept) == ["step00000004", "step00000008", "step00000012"]


@pytest.mark.slow
def test_zero3_bf16_with_accumulation_trains_saves_and_resumes(setup):
    root, config = setup
    cfg = config("zero3", train={"deepspeed": "zero3", "precision": "bf16", "grad_accum": 2, "keep_checkpoints": 1},
                 optim={"epochs": 1})
    torchrun(cfg)
    m = metrics(root / "zero3")
    assert [x["step"] for x in m] == [1, 2, 3]  # 6 micro-batches per rank per epoch / 2
    assert all(x["train/loss"] == x["train/loss"] for x in m)  # finite
    tag = ckpt.find_latest(root / "zero3" / "checkpoints")
    assert any(tag.glob("*zero_pp_rank_1_*model_states.pt"))  # parameters partitioned over 2 ranks
    torchrun(cfg, "optim.epochs=2")  # longer schedule: resumes from step 3
    m = metrics(root / "zero3")
    assert [x["step"] for x in m] == [1, 2, 3, 4, 5, 6]
    assert [d.name for d in (root / "zero3" / "checkpoints").iterdir() if d.is_dir()] == ["step00000006"]
    model = ToyModel(ToyConfig())
    weights.load_weights(model, root / "zero3")


def test_first_start_names_the_ops_it_will_compile(tmp_path, monkeypatch):
    import io

    from pipeline.train.ops import announce_op_builds

    def announce(offload: bool) -> tuple[list[str], str]:
        out = io.StringIO()
        return announce_op_builds(offload, stream=out), out.getvalue()

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty cache
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert announce(True) == (["deepspeed_shm_comm", "cpu_adam"], (
        "first start: DeepSpeed compiles deepspeed_shm_comm (shared-memory collectives for CPU ranks), "
        "cpu_adam (CPU Adam for ZeRO-Offload), about 5.8 min on 2 CPU cores (less with more); once, "
        f"cached in {tmp_path}\n"))
    (tmp_path / "cpu_adam" / "cpu_adam.so").write_bytes(b"")  # built by an earlier start
    names, line = announce(True)
    assert names == ["deepspeed_shm_comm"] and "about 80 s" in line and "cpu_adam" not in line
    assert announce(False)[0] == ["deepspeed_shm_comm"]
    monkeypatch.setenv("LOCAL_RANK", "1")  # one line per machine
    assert announce(False) == (["deepspeed_shm_comm"], "")
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert announce(True) == ([], "")


@pytest.mark.slow
def test_zero3_offload_trains_and_checkpoints_on_cpu(setup):
    """ZeRO-3 with optimizer and parameters offloaded, DeepSpeed's CPU Adam (compiled on the
    first start of a machine, ~4.5 min on 2 cores, announced; cached after)."""
    from pipeline.train.ops import ops_to_build

    root, config = setup
    to_build = ops_to_build(offload_optimizer=True)
    cfg = config("offload", train={"deepspeed": "zero3_offload"}, optim={"max_steps": 3})
    r = torchrun(cfg, timeout=900)
    announced = [line for line in r.stderr.splitlines() if "first start: DeepSpeed compiles" in line]
    assert len(announced) == (1 if to_build else 0)  # local rank 0 only
    assert all(name in announced[0] for name in to_build)
    assert ops_to_build(offload_optimizer=True) == []  # now in the cache
    assert [x["step"] for x in metrics(root / "offload")] == [1, 2, 3]
    assert json.loads((root / "offload" / "status.json").read_text())["state"] == "finished"
    tag = ckpt.find_latest(root / "offload" / "checkpoints")
    assert tag.name == "step00000003" and any(tag.glob("*zero_pp_rank_1_*optim_states.pt"))
    model = ToyModel(ToyConfig())
    weights.load_weights(model, root / "offload")


@pytest.mark.slow
def test_sigusr1_checkpoints_at_the_next_step_and_stops(setup):
    root, config = setup
    cfg = config("signal", optim={"max_steps": 100000}, train={"image_grid_every": 0})
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(cfg)]  # a plain single process
    proc = subprocess.Popen(cmd, cwd=repo_root(), env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    run = root / "signal"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and len(metrics(run)) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-5000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "preempted" and 3 <= status["step"] < 100000
    tag = ckpt.find_latest(run / "checkpoints")
    assert tag.name == ckpt.tag_for(status["step"]) and ckpt.read_meta(tag)["step"] == status["step"]
    assert "SIGUSR1" in out


# --------------------------------------------------------------------------- no DeepSpeed needed


def _fake_tag(ckpt_dir: Path, step: int, complete: bool) -> Path:
    d = ckpt_dir / ckpt.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (d / ckpt.MARKER).write_text(json.dumps({"step": step}))
    return d


def test_half_written_checkpoint_is_never_picked_up(tmp_path):
    c = tmp_path / "checkpoints"
    assert ckpt.find_latest(c) is None and ckpt.resolve_resume("latest", tmp_path) is None
    _fake_tag(c, 4, True)
    good = _fake_tag(c, 8, True)
    _fake_tag(c, 12, False)  # killed while writing: DeepSpeed files, no marker
    (c / ckpt.LATEST).write_text("step00000012")  # even if 'latest' already names it
    assert ckpt.find_latest(c) == good
    assert ckpt.resolve_resume("latest", tmp_path) == good
    assert ckpt.resolve_resume(str(c / "step00000004"), tmp_path).name == "step00000004"
    assert ckpt.resolve_resume("none", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="train.resume"):
        ckpt.resolve_resume(str(c / "step00000012"), tmp_path / "elsewhere")
    # pruning keeps the newest complete ones and drops incomplete leftovers older than them
    _fake_tag(c, 6, False)
    ckpt.prune(c, keep=1, protect=good)
    assert sorted(d.name for d in c.iterdir() if d.is_dir()) == ["step00000008", "step00000012"]


def test_launcher_environments_map_to_torch_variables():
    torchrun_env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert map_launcher_env(dict(torchrun_env)) == torchrun_env
    srun = map_launcher_env({"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4",
                             "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "gpu[07-08]"})
    assert (srun["RANK"], srun["LOCAL_RANK"], srun["WORLD_SIZE"]) == ("3", "1", "4")
    assert srun["MASTER_ADDR"] == "gpu07" and srun["MASTER_PORT"] == str(15000 + 1234)
    # the batch script itself (no srun step): one plain process, whatever the job's task count
    batch = map_launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "5"})
    assert (batch["RANK"], batch["WORLD_SIZE"]) == ("0", "1")
    single = map_launcher_env({})
    assert (single["RANK"], single["WORLD_SIZE"], single["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")


def test_zero_dim_parameters_are_named_before_deepspeed_starts():
    from pipeline.train.loop import reject_scalar_parameters

    model = torch.nn.Linear(2, 2)
    reject_scalar_parameters(model)  # ordinary parameters pass
    model.scale = torch.nn.Parameter(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"\['scale'\] are 0-dim"):
        reject_scalar_parameters(model)
