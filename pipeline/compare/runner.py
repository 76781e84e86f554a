"""Train and evaluate every variant x seed of a sweep, one after another, each through the
ordinary trainer CLI in subprocesses (``torch.distributed.run``, the ranks on CPU over gloo
without a GPU) and the task's own evaluation CLI (``python -m pipeline.eval TASK``).

``SWEEP_DIR/NAME/seedS/`` is an ordinary run directory (config.yaml, tensorboard/,
checkpoints/, eval.json) plus ``sweep_run.json`` (overrides, state, wall clock, error) and
``cost.json`` (one measured training step). Running again skips finished runs and resumes the
others from their checkpoints (``train.resume=latest``); a failing run is recorded and the next
one starts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.config import ConfigError, load_config
from pipeline.files import atomic_write_text
from pipeline.models import eval_task

from . import match as matching
from .measure import forward_budget, start_weights, step_cost
from .sweep import Sweep, Variant

RUN_RECORD = "sweep_run.json"
COST = "cost.json"
MATCH = "match.json"
LOG = "sweep.log"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1))


def child_env() -> dict:
    """The trainer's environment: without a GPU, DeepSpeed's CPU accelerator and half the cores
    per rank of two (as launch/demo.sh)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    return env


def nproc(ranks: int) -> int:
    return min(ranks, torch.cuda.device_count()) if torch.cuda.is_available() else ranks


def _run_logged(cmd: list[str], log_path: Path) -> int:
    """Run ``cmd`` (an argument list, no shell), appending its output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env()).returncode


def _tail(path: Path, lines: int = 12) -> str:
    """The cause of the last command's failure in ``path``: its error lines (a config error, an
    exception's last line) first, then the log's last lines."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    last = text.rsplit("\n$ ", 1)[-1].splitlines()
    causes = [line.strip() for line in last if "config error:" in line or line.startswith(("RuntimeError", "ValueError",
                                                                                           "ConfigError", "KeyError"))]
    return "\n".join(dict.fromkeys(causes[-3:] + last[-lines:]))


def train_command(config: str, overrides: list[str], ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc(ranks)),
            "-m", "pipeline.train", "--config", config, *overrides]


def _state(run_dir: Path) -> str | None:
    status = _read_json(run_dir / "status.json")
    return status.get("state") if status else None


class Runner:
    def __init__(self, sweep: Sweep, out: Path, extra: list[str] = (), seeds: list[int] | None = None, log=print):
        self.sweep, self.out, self.extra = sweep, Path(out), list(extra)
        self.seeds = seeds if seeds is not None else sweep.seeds
        self.log = log

    # ------------------------------------------------------------------ overrides

    def variant_overrides(self, variant: Variant, more: list[str] = ()) -> list[str]:
        warm = [f"train.init_from={self.out / 'warm_start'}"] if self.sweep.warm_start else []
        return [*self.sweep.overrides, *variant.overrides, *warm, *self.extra, *more]

    def run_overrides(self, variant: Variant, seed: int) -> list[str]:
        chosen = self.matched(variant)
        more = [chosen["override"]] if chosen else []
        run_dir = self.out / variant.name / f"seed{seed}"
        return self.variant_overrides(variant, more) + [
            f"train.seed={seed}", f"data.seed={seed}", f"train.run_dir={run_dir}", "train.resume=latest"]

    def load(self, variant: Variant, more: list[str] = ()):
        return load_config(self.sweep.base, self.variant_overrides(variant, more))

    # ------------------------------------------------------------------ budgets

    def matched(self, variant: Variant) -> dict | None:
        """The knob chosen for a matched variant, measured once and kept in NAME/match.json; measured
        again when the weights the runs start from have changed since (a warm start trained after
        a ``plan``)."""
        if not variant.match:
            return None
        path = self.out / variant.name / MATCH
        found = _read_json(path)
        weights = start_weights(self.load(variant))
        if (found and found.get("kind") == variant.match and found.get("reference") == variant.reference
                and (found.get("measured_on") or {}).get("weights") == weights):
            return found
        reference = self.sweep.variants[variant.reference]
        chosen = matching.match_budget(variant.match, self.load(reference), lambda more: self.load(variant, more),
                                       forward_budget, variant.tolerance)
        chosen["reference"] = variant.reference
        _write_json(path, chosen)
        self.log(f"[compare] {variant.name}: {chosen['override']} gives {variant.match} {chosen['measured']:.4g} "
                 f"against {variant.reference}'s {chosen['target']:.4g} ({100 * chosen['relative_error']:.1f}% off"
                 f"{'' if chosen['within_tolerance'] else ', OUTSIDE the tolerance'}; measured with weights "
                 f"{chosen['measured_on']['weights']} on images {chosen['measured_on']['images']})")
        return chosen

    # ------------------------------------------------------------------ runs

    def warm_start_overrides(self) -> list[str]:
        # the command line's data and evaluation sets apply to it; its schedule is its own
        shared = [e for e in self.extra if e.startswith(("data.", "eval."))]
        return [*self.sweep.warm_start.overrides, *shared, f"train.run_dir={self.out / 'warm_start'}",
                "train.resume=latest"]

    def warm_start(self) -> str | None:
        """Train the shared warm start once; returns an error message or None."""
        ws = self.sweep.warm_start
        if ws is None:
            return None
        run_dir = self.out / "warm_start"
        if _state(run_dir) == "finished":
            return None
        self.log(f"[compare] warm start {ws.config} into {run_dir}")
        rc = _run_logged(train_command(ws.config, self.warm_start_overrides(), self.sweep.ranks), run_dir / LOG)
        if rc != 0 or _state(run_dir) != "finished":
            return f"warm start failed (exit {rc}); see {run_dir / LOG}:\n{_tail(run_dir / LOG)}"
        return None

    def run_one(self, variant: Variant, seed: int, warm_error: str | None = None) -> str:
        """Train (or resume), evaluate and measure one run; returns its state."""
        run_dir = self.out / variant.name / f"seed{seed}"
        record_path = run_dir / RUN_RECORD
        record = _read_json(record_path) or {"variant": variant.name, "seed": seed, "train_s": 0.0, "attempts": 0}
        if record.get("state") == "finished" and (run_dir / "eval.json").is_file() and (run_dir / COST).is_file():
            self.log(f"[compare] {variant.name} seed {seed}: finished, skipped")
            return "finished"
        if warm_error:
            record.update(state="failed", error=warm_error)
            _write_json(record_path, record)
            return "failed"
        try:
            overrides = self.run_overrides(variant, seed)
            cfg = load_config(self.sweep.base, overrides)
        except (ConfigError, ValueError) as err:
            record.update(state="failed", error=f"config error: {err}")
            _write_json(record_path, record)
            self.log(f"[compare] {variant.name} seed {seed}: FAILED: config error: {err}")
            return "failed"
        record.update(overrides=overrides, base=self.sweep.base, error=None)
        log_path = run_dir / LOG
        if _state(run_dir) != "finished":
            self.log(f"[compare] {variant.name} seed {seed}: training into {run_dir}"
                     + (" (resuming)" if (run_dir / "checkpoints").is_dir() else ""))
            record["attempts"] += 1
            record.update(state="training", evaluated=False)
            (run_dir / COST).unlink(missing_ok=True)  # measured again on the configuration trained
            _write_json(record_path, record)
            t0 = time.time()
            rc = _run_logged(train_command(self.sweep.base, overrides, self.sweep.ranks), log_path)
            record["train_s"] += time.time() - t0
            state = _state(run_dir)
            if rc != 0 or state != "finished":
                record.update(state="failed" if rc != 0 else (state or "failed"),
                              error=f"training exit {rc}, state {state}; see {log_path}:\n{_tail(log_path)}")
                _write_json(record_path, record)
                self.log(f"[compare] {variant.name} seed {seed}: {record['state'].upper()} (exit {rc})")
                return record["state"]
        task = eval_task(cfg.model.name)
        if not (run_dir / "eval.json").is_file() or record.get("evaluated") is not True:
            self.log(f"[compare] {variant.name} seed {seed}: {task} evaluation")
            t0 = time.time()
            rc = _run_logged([sys.executable, "-m", "pipeline.eval", task, "--run", str(run_dir)], log_path)
            record["eval_s"] = time.time() - t0
            if rc != 0:
                record.update(state="failed", error=f"evaluation exit {rc}; see {log_path}:\n{_tail(log_path)}")
                _write_json(record_path, record)
                self.log(f"[compare] {variant.name} seed {seed}: evaluation FAILED (exit {rc})")
                return "failed"
            record["evaluated"] = True
        if not (run_dir / COST).is_file():
            # the configuration the trainer resolved (autobatch's micro-batch included)
            resolved = load_config(run_dir / "config.yaml", run_imports=False)
            _write_json(run_dir / COST, {**step_cost(resolved), "task": task,
                                          "device": "cuda" if torch.cuda.is_available() else "cpu"})
        record["state"] = "finished"
        _write_json(record_path, record)
        self.log(f"[compare] {variant.name} seed {seed}: finished")
        return "finished"

    def tasks(self, only: list[str] | None = None) -> list[tuple[str, int]]:
        """``(variant, seed)`` in the order :meth:`run` takes them (an array job's task ids)."""
        names = only or list(self.sweep.variants)
        return [(name, seed) for seed in self.seeds for name in names]

    def run(self, only: list[str] | None = None) -> dict[str, str]:
        """Every selected variant x seed; returns ``{"NAME/seedS": state}``."""
        names = only or list(self.sweep.variants)
        unknown = [n for n in names if n not in self.sweep.variants]
        if unknown:
            raise ConfigError(f"--only: {unknown} not in the sweep's variants {list(self.sweep.variants)}")
        self.out.mkdir(parents=True, exist_ok=True)
        _write_json(self.out / "sweep.json", {**self.sweep.to_dict(), "extra_overrides": self.extra,
                                               "seeds": self.seeds})
        warm_error = self.warm_start()
        states = {}
        # seed-major: a sweep cut short has every variant at its first seeds
        for seed in self.seeds:
            for name in names:
                variant = self.sweep.variants[name]
                try:
                    states[f"{name}/seed{seed}"] = self.run_one(variant, seed, warm_error)
                except Exception as err:  # noqa: BLE001 - one broken variant must not stop the sweep
                    record_path = self.out / name / f"seed{seed}" / RUN_RECORD
                    record = _read_json(record_path) or {"variant": name, "seed": seed}
                    record.update(state="failed", error=f"{type(err).__name__}: {err}")
                    _write_json(record_path, record)
                    self.log(f"[compare] {name} seed {seed}: FAILED: {type(err).__name__}: {err}")
                    states[f"{name}/seed{seed}"] = "failed"
        return states
