"""Shared by the SLURM tests (tests/test_slurm.py on one node, tests/test_slurm_nodes.py on
several): the tiny job's overrides, the job environment and readers of what a run leaves."""
from __future__ import annotations

from pathlib import Path

from tests.helpers_train import subprocess_env

# the tiny ALBEF+ELIP config on CPU, a few steps of batch 4 per rank
TINY = ["data.batch_size=4", "data.workers=0", "optim.warmup_steps=1", "train.checkpoint_every=0",
        "train.image_grid_every=0", "model.queue_size=16"]


def job_env() -> dict:
    # the job inherits this environment from sbatch: the worktree's package, the CPU accelerator,
    # HOME (DeepSpeed's compiled CPU op in ~/.cache/torch_extensions)
    return subprocess_env()


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} does not exist)"


def scalars(run_dir: Path) -> dict:
    """``{tag: [steps]}`` of the run's TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
