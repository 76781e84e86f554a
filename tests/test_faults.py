"""The fault suite: what a run survives and how every failure names its cause (README, "What
survives what"). One tiny trained run (single process, ZeRO-2, checkpoints every 2 steps) is
shared by the module; the trainers these tests kill run with a private copy of the DeepSpeed
op cache.

Cases proven elsewhere and not repeated here:
- a half-written checkpoint (killed mid-save: files, no ``meta.json``) is never picked up:
  ``tests/test_train.py::test_half_written_checkpoint_is_never_picked_up`` (and the resume below
  starts past one);
- SIGUSR1 (SLURM's pre-emption signal) checkpoints and stops: ``tests/test_train.py::
  test_sigusr1_checkpoints_at_the_next_step_and_stops``; exact resume on 2 ranks:
  ``test_zero2_two_ranks_resume_equals_straight_run``;
- a rerun after a kill before the first checkpoint logs each step once:
  ``tests/test_train.py::test_a_rerun_logs_each_step_once`` (and the kill sequence below);
- a corrupt JPEG and a tar cut inside a member are skipped and counted:
  ``tests/test_loader.py::test_corrupt_sample_and_truncated_tar_are_skipped_and_counted``;
- ``../``, absolute and outside-link members are refused when a download is unpacked:
  ``tests/test_data_prep.py::test_extract_refuses_members_outside_the_target``;
- data_prep killed mid-way resumes to the uninterrupted bytes: ``tests/test_data_prep.py::
  test_resume_after_kill_gives_the_uninterrupted_result`` (one worker; two workers below),
  ``tests/test_data_prep_urls.py::test_sbu_text_files_resume_after_kill``;
- shard specs run no shell: ``tests/test_shards.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.models import weights
from pipeline.models.weights import CheckpointError
from pipeline.train import checkpoint as ckpt
from tests.helpers_train import ToyConfig, ToyModel, repo_root, subprocess_env, toy_config_dict, write_shards

STEPS = 8  # the shared run: checkpoints at 2, 4, 6, 8
FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "trainer_rank00000.pt")


class Payload:
    """Unpickled by a full unpickler, this creates ``path``: the proof that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """Subprocess environment with a private DeepSpeed op cache (copied from the warm one, so
    a killed trainer never holds the shared cache's build lock)."""
    from torch.utils.cpp_extension import _get_build_directory

    # the op's directory sits in the cache root (~/.cache/torch_extensions/py311_cu130 by default)
    shared = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)).parent
    private = tmp_path_factory.mktemp("ext") / "torch_extensions"
    shutil.copytree(shared, private, ignore=shutil.ignore_patterns("lock"))
    return {**subprocess_env(), "TORCH_EXTENSIONS_DIR": str(private)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, env):
    """Shards, a config writer and one straight run of ``STEPS`` steps (all checkpoints kept)."""
    root = tmp_path_factory.mktemp("faults")
    write_shards(root / "shards", shards=2, per_shard=16)  # batch 4: 8 steps per epoch

    def config(name: str, **train) -> Path:
        values = {"checkpoint_every": 2, "keep_checkpoints": 0, "image_grid_every": 0, "stop_at_step": STEPS, **train}
        cfg = toy_config_dict(str(root / name), str(root / "shards"), optim={"max_steps": 1000}, train=values)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    straight = config("straight")
    r = _train(straight, env)
    assert r.returncode == 0, r.stderr[-5000:]
    return root, config, root / "straight"


def _cmd(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", "--config", str(config), *overrides]


def _train(config: Path, env: dict, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(config, *overrides), cwd=repo_root(), env=env, capture_output=True, text=True,
                          timeout=300)


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    cfg["train"]["run_dir"] = str(dst)
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --------------------------------------------------------------------------- no code from a checkpoint


def test_the_payload_runs_under_a_full_unpickler(tmp_path):
    """The control: the payload used below is real (DeepSpeed's own loads would run it)."""
    marker = tmp_path / "pwned"
    torch.save({"module": Payload(marker)}, tmp_path / "x.pt")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", FILES)
def test_a_pickle_payload_in_any_checkpoint_file_is_refused(setup, tmp_path, name):
    """Evaluation and ``train.init_from`` (consolidation), the resume pre-check and the
    engine's own checkpoint reads all refuse it, naming the file; nothing runs."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    _, _, straight = setup
    tag = tmp_path / ckpt.tag_for(STEPS)
    shutil.copytree(straight / "checkpoints" / tag.name, tag)
    marker = tmp_path / "pwned"
    original = torch.load(tag / name, weights_only=False)
    original["payload"] = Payload(marker)
    torch.save(original, tag / name)

    refused = f"checkpoint file {tag / name} holds objects outside the allow-list"
    with pytest.raises(CheckpointError, match=refused) as err:
        ckpt.check(tag)
    assert "io.open" in str(err.value)  # the global the payload calls
    with pytest.raises(CheckpointError, match=refused):
        weights.load_file(tag / name)

    class Engine:  # what use_safe_engine needs of a DeepSpeed engine
        checkpoint_engine = TorchCheckpointEngine()
        _config = None

    engine = Engine()
    ckpt.use_safe_engine(engine)
    with pytest.raises(CheckpointError, match=refused):
        engine.checkpoint_engine.load(str(tag / name), map_location=lambda storage, loc: storage)
    if name != "trainer_rank00000.pt":  # the module weights are read from these two
        with pytest.raises(CheckpointError, match=refused):
            weights.load_weights(ToyModel(ToyConfig()), tag)
        with pytest.raises(CheckpointError, match=refused):
            weights.init_from(ToyModel(ToyConfig()), tag)
    assert not marker.exists()


SPY = """
import json, sys, torch
calls = []
load = torch.load
def spy(*args, **kwargs):
    calls.append(kwargs.get("weights_only"))
    return load(*args, **kwargs)
torch.load = spy  # DeepSpeed's checkpoint engine and ours both call torch.load through the module
from pipeline.config import load_config
from pipeline.train.distributed import setup_distributed
from pipeline.train.loop import Trainer
trainer = Trainer(load_config(sys.argv[1]), setup_distributed())
print(json.dumps({"step": trainer.step, "calls": calls}))
"""


@pytest.mark.slow
def test_resume_through_the_deepspeed_engine_loads_weights_only(setup, env):
    """A real resume (``engine.load_checkpoint``: model states, ZeRO partition, scheduler, then
    the trainer state) calls ``torch.load`` only with ``weights_only=True``."""
    _, _, straight = setup
    r = subprocess.run([sys.executable, "-c", SPY, str(straight / "config.yaml")], cwd=repo_root(), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["step"] == STEPS
    assert len(got["calls"]) >= 3 and set(got["calls"]) == {True}, got["calls"]


def test_checkpoint_files_hold_only_allow_listed_classes(setup):
    """What the trainer writes passes the pre-check and loads with weights_only (RNG state as
    tensors and ints, not numpy objects)."""
    _, _, straight = setup
    tag = straight / "checkpoints" / ckpt.tag_for(STEPS)
    ckpt.check(tag)
    state = weights.load_file(ckpt.rank_file(tag, 0))
    assert isinstance(state["rng"]["numpy"]["key"], torch.Tensor)
    assert len(state["rng"]["python"][1]) == 625


# --------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_model_file_is_named(setup, tmp_path, damage):
    _, _, straight = setup
    tag = tmp_path / ckpt.tag_for(STEPS)
    shutil.copytree(straight / "checkpoints" / tag.name, tag)
    f = tag / "mp_rank_00_model_states.pt"
    if damage == "truncated":
        _truncate(f)
    else:
        f.write_bytes(b"")
    for read in (lambda: ckpt.check(tag), lambda: weights.load_weights(ToyModel(ToyConfig()), tag)):
        with pytest.raises(CheckpointError, match=f"checkpoint file {f} is damaged: "):
            read()
    f.unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint file {f} is missing"):
        ckpt.check(tag)


@pytest.mark.slow
def test_resume_skips_checkpoints_that_do_not_load(setup, tmp_path, env):
    """Newest first: step 8 killed mid-save (no meta.json, a file cut short), step 6 complete
    but its model file truncated (a power loss before the data reached the disk), step 4 with a
    pickle payload in a ZeRO partition; resume takes step 2, says which it skipped and why, and
    ends where the straight run ended, with the same losses."""
    _, _, straight = setup
    run = _copy_run(straight, tmp_path / "run")
    c = run / "checkpoints"
    (c / ckpt.tag_for(8) / ckpt.MARKER).unlink()
    _truncate(c / ckpt.tag_for(8) / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    _truncate(c / ckpt.tag_for(6) / "mp_rank_00_model_states.pt")
    marker = tmp_path / "pwned"
    part = c / ckpt.tag_for(4) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(part, weights_only=False)
    state["payload"] = Payload(marker)
    torch.save(state, part)
    (run / "status.json").unlink()

    r = _train(run / "config.yaml", env)
    assert r.returncode == 0, r.stderr[-5000:]
    assert f"skipping checkpoint {c / ckpt.tag_for(6)}: checkpoint file {c / ckpt.tag_for(6)}/mp_rank_00_model_states.pt is damaged" in r.stderr
    assert f"skipping checkpoint {c / ckpt.tag_for(4)}: checkpoint file {part} holds objects outside the allow-list" in r.stderr
    assert f"resumed from {c / ckpt.tag_for(2)} at step 2" in r.stderr
    assert not marker.exists()
    assert _status(run)["state"] == "stopped" and _status(run)["step"] == STEPS
    a, b = _metrics(straight), _metrics(run)
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert y["train/loss"] == pytest.approx(x["train/loss"], rel=1e-5, abs=1e-6), x["step"]


@pytest.mark.slow
def test_no_loadable_checkpoint_fails_with_one_line_and_status_failed(setup, tmp_path, env):
    _, _, straight = setup
    run = _copy_run(straight, tmp_path / "run")
    for tag in weights.complete_tags(run / "checkpoints"):
        _truncate(tag / "mp_rank_00_model_states.pt")
    r = _train(run / "config.yaml", env)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "train.resume=latest: no checkpoint of" in line[0] and "is damaged" in line[0]
    status = _status(run)
    assert status["state"] == "failed" and status["error"] == line[0][len("error: "):]


def test_checkpoint_files_are_fsynced_as_they_are_written(tmp_path, monkeypatch):
    """What the engine and the trainer write goes through save_file, which fsyncs each file
    (the marker is written after every rank's save_file returned)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()
        _config = None

    engine = Engine()
    ckpt.use_safe_engine(engine)
    engine.checkpoint_engine.save({"w": torch.ones(3)}, str(tmp_path / "a.pt"))
    ckpt.save_file({"rng": torch.zeros(2)}, tmp_path / "b.pt")
    assert synced == [str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]


# --------------------------------------------------------------------------- disk full


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs (root: the test command runs as root), unmounted afterwards."""
    mnt = tmp_path / "checkpoints"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"mounting a tmpfs needs root (the test command runs as root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_disk_is_named_with_the_file(small_tmpfs):
    f = small_tmpfs / "big.pt"
    with pytest.raises(CheckpointError, match=f"^no space left on device writing {f}$"):
        ckpt.save_file({"w": torch.zeros(100_000)}, f)


@pytest.mark.slow
def test_disk_full_during_a_save_fails_with_one_line_and_status_failed(setup, tmp_path, env, small_tmpfs):
    """The checkpoints directory is a 64 KiB tmpfs: the first save fills it."""
    root, _, _ = setup
    run = small_tmpfs.parent
    cfg = toy_config_dict(str(run), str(root / "shards"), optim={"max_steps": 4},
                          train={"checkpoint_every": 2, "image_grid_every": 0})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = _train(tmp_path / "c.yaml", env)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "inline_container" not in r.stderr and "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: no space left on device writing {small_tmpfs / ckpt.tag_for(2)}/")
    status = _status(run)
    assert status["state"] == "failed" and status["step"] == 2 and status["error"] == lines[0][len("error: "):]
    assert weights.find_latest(small_tmpfs) is None  # the half-written checkpoint is not complete


# --------------------------------------------------------------------------- kills and signals


def _start(config: Path, env: dict, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(_cmd(config, *overrides), cwd=repo_root(), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int) -> None:
    """Until this process has logged ``step`` (status.json names its pid once it is past
    resume, its signal handlers installed and metrics.jsonl cut back to its start)."""
    deadline = time.time() + 180

    def ours() -> bool:
        try:
            return _status(run).get("pid") == proc.pid
        except (OSError, ValueError):
            return False

    while not (ours() and any(m["step"] >= step for m in _metrics(run))):
        assert proc.poll() is None, f"trainer ended before step {step}:\n{proc.stdout.read()[-4000:]}"
        assert time.time() < deadline
        time.sleep(0.01)


@pytest.mark.slow
def test_kill9_before_the_first_checkpoint_then_mid_run_then_sigterm_ends_as_a_straight_run(setup, env):
    """kill -9 before any checkpoint (the rerun starts afresh), kill -9 mid-run (resume from the
    newest complete checkpoint), SIGTERM (checkpoint at the next step, exit 0, 'preempted'),
    then on to the end: every step logged once, the losses of the uninterrupted run."""
    root, config, straight = setup
    cfg = config("killed")
    run = root / "killed"

    proc = _start(cfg, env, "train.checkpoint_every=0")
    _wait_for_step(proc, run, 1)
    proc.kill()
    proc.communicate()
    assert weights.find_latest(run / "checkpoints") is None
    assert _status(run)["state"] == "running" and _status(run)["pid"] == proc.pid  # kill -9 leaves no word

    proc = _start(cfg, env)
    _wait_for_step(proc, run, 3)
    proc.kill()
    out, _ = proc.communicate()
    assert "resumed from" not in out  # a fresh start
    resumed_at = weights.read_meta(weights.find_latest(run / "checkpoints"))["step"]
    assert 2 <= resumed_at < STEPS

    proc = _start(cfg, env)
    _wait_for_step(proc, run, resumed_at + 1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-4000:]
    assert f"resumed from {run / 'checkpoints' / ckpt.tag_for(resumed_at)} at step {resumed_at}" in out
    status = _status(run)
    if status["state"] == "preempted":  # (the signal may land after the last step: then 'stopped')
        assert "SIGTERM" in out
        assert weights.find_latest(run / "checkpoints").name == ckpt.tag_for(status["step"])
    else:
        assert status["state"] == "stopped"

    r = _train(cfg, env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert _status(run)["state"] == "stopped" and _status(run)["step"] == STEPS
    a, b = _metrics(straight), _metrics(run)
    assert [m["step"] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        for key in ("train/loss", "train/lr", "train/grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    sa = weights.consolidated_state_dict(weights.find_latest(straight / "checkpoints"))
    sb = weights.consolidated_state_dict(weights.find_latest(run / "checkpoints"))
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- shards and data_prep


def test_empty_and_dotdot_named_tars_are_counted_and_training_goes_on(tmp_path):
    """An empty (0-byte) shard and a shard whose members are named ``../KEY.*`` (a tar crafted to
    escape a directory) are read without writing anything to disk: the first yields nothing and
    is counted, the second's samples are just samples with an odd key."""
    import tarfile

    from pipeline.config import DataConfig
    from pipeline.data import TrainLoader

    write_shards(tmp_path, shards=2, per_shard=8)
    (tmp_path / "toy-000001.tar").write_bytes(b"")
    src = tmp_path / "toy-000000.tar"
    with tarfile.open(src) as tf_in, tarfile.open(tmp_path / "dotdot-000000.tar", "w") as tf_out:
        for m in tf_in.getmembers():
            data = tf_in.extractfile(m).read()
            m.name = "../" + m.name
            tf_out.addfile(m, __import__("io").BytesIO(data))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"].append({"name": "dotdot-000000.tar", "num_samples": 8})
    manifest["num_samples"] += 8
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    cfg = DataConfig(train_shards=str(tmp_path), image_size=32, batch_size=4, workers=0, shuffle_buffer=0)
    loader = TrainLoader(cfg, rank=0, world_size=1)
    batches = list(loader.iter_epoch(0))
    keys = [k for b in batches for k in b["key"]]
    assert {k for k in keys if k.startswith("../")} == {f"../000{i:03d}" for i in range(8)}
    assert len(batches) == 6  # the manifest's 24 samples per epoch: training goes on
    assert not list(tmp_path.parent.glob("000*.jpg"))  # nothing was written next to the shards
    assert loader.position.errors >= 1  # the empty shard


def test_data_prep_with_two_workers_killed_mid_way_resumes_to_the_same_shards(tmp_path):
    from data_prep import synthetic

    args = ["--num", "36", "--shard-size", "6", "--image-size", "32", "--min-shards", "1", "--workers", "2",
            "--no-progress"]
    synthetic.build(tmp_path / "reference", num=36, seed=0, image_size=32, shard_size=6, min_shards=1, workers=2)
    out = tmp_path / "killed"
    env = {**subprocess_env(), "DATA_PREP_TEST_SLEEP": "0.05"}
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "synthetic", *args, "--out", str(out)],
                            cwd=repo_root(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 120
    while len(list((out / "_progress" / "synthetic").glob("0*.json"))) < 2:
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the workers too
    proc.wait()
    proc.stderr.close()
    assert not (out / "manifest.json").exists()
    done = len(list((out / "_progress" / "synthetic").glob("0*.json")))
    assert done < 6  # it really stopped half-way
    r = subprocess.run([sys.executable, "-m", "data_prep", "synthetic", *args, "--out", str(out)],
                       cwd=repo_root(), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "reference").glob("*.tar"))
    assert names == sorted(p.name for p in out.glob("*.tar")) and len(names) == 6
    for name in names:
        assert _members(out / name) == _members(tmp_path / "reference" / name)
    assert not list(out.glob(".*.partial"))


def _members(tar: Path) -> dict:
    import tarfile

    with tarfile.open(tar) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
