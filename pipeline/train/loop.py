"""The pre-training loop: DeepSpeed engine, steps, logging, checkpoints, signals, evaluation."""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import ExperimentConfig, save_config
from pipeline.data import TrainLoader
from pipeline.eval.tasks import check_contract, evaluation
from pipeline.files import atomic_write_text
from pipeline.models import build_model, eval_task
from pipeline.models.contracts import FollowsProgress, GradCheckpointing, HasTeacher, PatchModel
from pipeline.models.layers import DTYPES
from pipeline.models.weights import CheckpointError, complete_tags, init_from

from . import autobatch as ab
from . import checkpoint as ckpt
from .distributed import DistInfo, setup_distributed
from .monitor import Monitor, kept_patch_grid, peak_memory_gb
from .optim import build_ds_config, build_optimizer, build_scheduler, check_precision, offloads_optimizer

log = logging.getLogger("pipeline.train")


class StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.signum = 0

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum


def _setup_logging(run_dir: Path, rank: int) -> None:
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if rank == 0:
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _write_status(run_dir: Path, state: str, step: int, **extra) -> None:
    atomic_write_text(run_dir / "status.json", json.dumps({"state": state, "step": step, "time": time.time(), **extra}))


def failure_line(err: BaseException) -> str:
    """The one line a failed run reports (stderr and ``status.json``): our own errors already
    name their key or file; anything else gets its type in front."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (CheckpointError, ValueError, FileNotFoundError)):
        return text
    return f"{type(err).__name__}: {text}"


def _write_failure(run_dir: Path, started: float, step: int, err: BaseException, rank: int) -> None:
    """status.json says 'failed' with the first failure's line: once one rank has failed, the
    others' errors (a peer that went away) would only hide the cause."""
    line = failure_line(err)
    log.error("failed: %s", line)
    try:
        old = json.loads((run_dir / "status.json").read_text())
        if old.get("state") == "failed" and old.get("time", 0) >= started:
            return
    except (OSError, ValueError):
        pass
    _write_status(run_dir, "failed", step, error=line, rank=rank)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _eval_task(cfg: ExperimentConfig) -> str | None:
    """The evaluation ``eval.every`` runs: ``eval.task``, else the one the model is registered with."""
    if cfg.eval.every <= 0 and cfg.eval.every_epochs <= 0:
        return None
    if not cfg.eval.shards:
        raise ValueError("eval.shards: eval.every or eval.every_epochs > 0 needs an evaluation shard set")
    if cfg.eval.task:
        evaluation(cfg.eval.task)  # an unknown name is an error listing the known ones
        return cfg.eval.task
    return eval_task(cfg.model.name)


def reject_scalar_parameters(model: torch.nn.Module) -> None:
    """DeepSpeed broadcasts parameters as byte views, which torch refuses for 0-dim tensors:
    name them up front instead of failing inside ``deepspeed.initialize``."""
    scalars = [name for name, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        raise ValueError(f"model parameters {scalars} are 0-dim: DeepSpeed cannot broadcast them; give them shape [1]")


class Trainer:
    def __init__(self, cfg: ExperimentConfig, info: DistInfo):
        import deepspeed

        self.cfg, self.info = cfg, info
        t = cfg.train
        self.run_dir = Path(t.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.dtype = DTYPES[t.precision]
        task = _eval_task(cfg)

        _seed_all(t.seed)  # the same initial weights on every rank
        model = build_model(cfg.model)
        self.evaluate = None
        if task is not None:  # refused now rather than at the first evaluation
            check_contract(model, task, cfg.model.name)
            self.evaluate = evaluation(task).evaluate
        if t.grad_checkpointing:
            if not isinstance(model, GradCheckpointing):
                raise ValueError(f"train.grad_checkpointing: model {cfg.model.name!r} has no set_grad_checkpointing()")
            model.set_grad_checkpointing(True)
        self.patch_size = model.patch_size if isinstance(model, PatchModel) else None
        # scheduled reduction settings (EViT keep rate, FLIP masking) follow the step
        self.scheduled = [m for m in model.modules() if isinstance(m, FollowsProgress)]
        self.schedule_values: dict[str, float] = {}
        self.exclude_frozen = t.exclude_frozen_parameters
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())

        self.ds_config = build_ds_config(cfg, info.world_size)
        self.loader = TrainLoader(cfg.data, rank=info.rank, world_size=info.world_size, batch_multiple=t.grad_accum)
        self.accum = t.grad_accum
        self.steps_per_epoch = self.loader.batches_per_epoch // self.accum
        self.total_steps = cfg.optim.max_steps or cfg.optim.epochs * self.steps_per_epoch
        self.global_batch = cfg.data.batch_size * self.accum * info.world_size

        reject_scalar_parameters(model)
        resume_from = ckpt.resolve_resume(t.resume, self.run_dir)
        if t.init_from and resume_from is None:
            tag_dir, copied, kept = init_from(model, t.init_from)
            if isinstance(model, HasTeacher):  # teacher copies (ALBEF's momentum encoders) follow
                model.copy_params()
            log.info("initialised %d tensors from %s; %d keep their initialisation (%s...)",
                     len(copied), tag_dir, len(kept), ", ".join(kept[:4]))
        optimizer = build_optimizer(model, cfg, offload=offloads_optimizer(self.ds_config))
        scheduler = build_scheduler(optimizer, cfg, self.total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        ckpt.use_safe_engine(self.engine)
        log.info("model %s: %.2fM parameters (%.2fM trainable); %d ranks, %s, ZeRO stage %s (%s), %s",
                 cfg.model.name, n_all / 1e6, n_train / 1e6, info.world_size, info.device,
                 self.ds_config.get("zero_optimization", {}).get("stage", 0), t.deepspeed, t.precision)
        log.info("data: %d samples/epoch, %d batches of %d per rank per epoch; %d steps/epoch, %d steps "
                 "(global batch %d)", self.loader.num_samples, self.loader.batches_per_epoch, cfg.data.batch_size,
                 self.steps_per_epoch, self.total_steps, self.global_batch)

        self.step = 0
        self.samples_seen = 0
        self.skipped_seen = 0  # fp16 overflow steps already reported
        self._resume(resume_from)

    # ------------------------------------------------------------------ resume

    def _loadable(self, newest: Path) -> Path:
        """``newest``, or with ``train.resume=latest`` the newest older complete checkpoint whose
        files all open (on every rank): a damaged one is skipped with a warning that says why."""
        candidates = [newest]
        if self.cfg.train.resume == "latest":
            candidates += [d for d in reversed(complete_tags(self.ckpt_dir)) if d != newest]
        reasons = []
        for tag_dir in candidates:
            try:
                ckpt.check(tag_dir)
                ok = 1
            except CheckpointError as err:
                ok, reasons = 0, reasons + [str(err)]
                log.warning("skipping checkpoint %s: %s", tag_dir, err)
            if self._reduce([float(ok)], dist.ReduceOp.MIN)[0] == 1:
                return tag_dir
            if ok:
                log.warning("skipping checkpoint %s: another rank cannot read its files", tag_dir)
        raise CheckpointError(f"train.resume={self.cfg.train.resume}: no checkpoint of {newest.parent} loads "
                              f"({len(candidates)} tried; newest: {reasons[0] if reasons else 'on another rank'})")

    def _resume(self, tag_dir: Path | None) -> None:
        info, t = self.info, self.cfg.train
        if tag_dir is None:
            _seed_all(t.seed + info.rank)  # per-rank training randomness (dropout, masking)
            return
        tag_dir = self._loadable(tag_dir)
        client, rank_state = ckpt.load(self.engine, tag_dir, rank=info.rank, exclude_frozen=self.exclude_frozen)
        self.step = int(client["step"])
        self.samples_seen = int(client.get("samples_seen", self.step * self.global_batch))
        if rank_state is not None and rank_state.get("world_size") == info.world_size:
            ckpt.set_rng_state(rank_state["rng"])
            self.loader.position.load_state_dict(rank_state["data"])
        else:
            log.warning("resuming %s with %d ranks (saved with another world size): data position and RNG "
                        "are approximated from the step", tag_dir, info.world_size)
            _seed_all(t.seed + info.rank + 1000003 * self.step)
            epoch = self.step // self.steps_per_epoch
            self.loader.position.start_epoch(epoch, num_workers=0)  # 0: unknown split, estimate the skip
            self.loader.position.batches = (self.step - epoch * self.steps_per_epoch) * self.accum
        log.info("resumed from %s at step %d (%d samples seen)", tag_dir, self.step, self.samples_seen)

    # ------------------------------------------------------------------ pieces

    def _barrier(self) -> None:
        dist.barrier()

    def save(self) -> Path:
        return ckpt.save(
            self.engine, self.ckpt_dir, self.step,
            client_state={"step": self.step, "samples_seen": self.samples_seen,
                          "epoch": self.step // self.steps_per_epoch},
            rank_state={"world_size": self.info.world_size, "rng": ckpt.rng_state(),
                        "data": self.loader.position.state_dict()},
            rank=self.info.rank, world_size=self.info.world_size, exclude_frozen=self.exclude_frozen,
            keep=self.cfg.train.keep_checkpoints, barrier=self._barrier)

    def run_eval(self, monitor: Monitor) -> dict | None:
        if self.evaluate is None:
            return None
        model = self.engine.module
        was_training = model.training
        model.eval()
        t0 = time.time()
        with torch.no_grad():
            metrics = self.evaluate(model, self.cfg, device=self.info.device, dtype=self.dtype,
                                    rank=self.info.rank, world_size=self.info.world_size)
        model.train(was_training)
        if self.info.is_main and metrics:
            monitor.scalars(self.step, {f"eval/{k}": float(v) for k, v in metrics.items()
                                        if isinstance(v, (int, float))})
            with open(self.run_dir / "eval_history.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")
            log.info("eval at step %d (%.0fs): %s", self.step, time.time() - t0,
                     " ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        return metrics

    # ------------------------------------------------------------------ loop

    def train(self) -> str:
        info, t = self.info, self.cfg.train
        stop = StopFlag()
        stop.install()
        monitor = Monitor(self.run_dir, self.step, info.is_main)
        dist.barrier()  # every rank is past resume: a rank that failed there has written 'failed'
        if info.is_main:
            _write_status(self.run_dir, "running", self.step, pid=os.getpid(), host=socket.gethostname())
        engine = self.engine
        engine.train()
        device = info.device

        interval = _Interval()
        # a resumed run already has a checkpoint (and any evaluation) at its start step
        last_saved = last_eval = self.step if self.step > 0 else -1
        state = "finished"
        last_batch = last_out = None
        try:
            while self.step < self.total_steps:
                epoch = self.step // self.steps_per_epoch
                batches = self.loader.iter_epoch(epoch)
                epoch_end = min(self.total_steps, (epoch + 1) * self.steps_per_epoch)
                while self.step < epoch_end:
                    self._step_lr = engine.get_lr()[0]  # the rate this step uses
                    self._set_progress()
                    for micro in range(self.accum):
                        t0 = time.perf_counter()
                        try:
                            batch = next(batches)
                        except StopIteration:
                            raise RuntimeError(f"the loader ended early in epoch {epoch} (step {self.step})") from None
                        interval.data_time += time.perf_counter() - t0
                        batch["image"] = batch["image"].to(device, dtype=self.dtype, non_blocking=True)
                        batch["epoch_progress"] = (self.step + micro / self.accum) / self.steps_per_epoch
                        out = engine(batch)
                        engine.backward(out["loss"])
                        engine.step()
                        interval.add(out, len(batch["text"]))
                        last_batch, last_out = batch, out
                    self.step += 1
                    self.samples_seen += self.global_batch
                    interval.steps += 1

                    signum = self._agreed_signal(stop)
                    if self.step % t.log_every == 0 or self.step == self.total_steps:
                        self._log(monitor, interval, last_out)
                        interval = _Interval()
                    if t.image_grid_every and self.step % t.image_grid_every == 0:
                        self._image_grid(monitor, last_batch, last_out)
                    if self._eval_due():
                        self.run_eval(monitor)
                        last_eval = self.step
                    if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                        self.save()
                        last_saved = self.step
                    if signum:
                        state = "preempted"
                        log.warning("signal %s: checkpointing at step %d and stopping (resume with train.resume=latest)",
                                    signal.Signals(signum).name, self.step)
                        break
                    if t.stop_at_step and self.step == t.stop_at_step:
                        state = "stopped"
                        log.info("train.stop_at_step=%d reached; checkpointing and stopping", t.stop_at_step)
                        break
                if state != "finished":
                    break
            if self.evaluate is not None and state == "finished" and last_eval != self.step:
                self.run_eval(monitor)
            if last_saved != self.step:
                self.save()
        finally:
            monitor.close()
        if info.is_main:
            _write_status(self.run_dir, state, self.step, total_steps=self.total_steps)
            log.info("%s at step %d/%d (%d samples seen); checkpoints in %s", state, self.step, self.total_steps,
                     self.samples_seen, self.ckpt_dir)
        return state

    def _eval_due(self) -> bool:
        every, epochs = self.cfg.eval.every, self.cfg.eval.every_epochs
        return bool(every and self.step % every == 0
                    or epochs and self.step % (epochs * self.steps_per_epoch) == 0)

    def _set_progress(self) -> None:
        values: dict[str, float] = {}
        for module in self.scheduled:
            values.update(module.set_progress(self.step, self.total_steps))
        self.schedule_values = values

    def _agreed_signal(self, stop: StopFlag) -> int:
        """A signal on any rank stops every rank at the same step."""
        flag = torch.tensor([stop.signum], dtype=torch.int64)
        if self.info.backend == "nccl":
            flag = flag.to(self.info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def _reduce(self, values: list[float], op) -> list[float]:
        x = torch.tensor(values, dtype=torch.float64)
        if self.info.backend == "nccl":
            x = x.to(self.info.device)
        dist.all_reduce(x, op=op)
        return x.cpu().tolist()

    def _log(self, monitor: Monitor, interval: "_Interval", out: dict) -> None:
        info = self.info
        world = info.world_size
        elapsed = max(time.perf_counter() - interval.start, 1e-9)
        keys = sorted(interval.losses)
        mem_tag, mem = peak_memory_gb(info.device)
        sums = self._reduce([interval.losses[k] / max(1, interval.micro) for k in keys]
                            + [interval.data_time / elapsed, float(self.loader.position.errors)], dist.ReduceOp.SUM)
        (mem_max,) = self._reduce([mem], dist.ReduceOp.MAX)
        rank_rate = torch.zeros(world, dtype=torch.float64)
        rank_rate[info.rank] = interval.samples / elapsed
        rates = self._reduce(rank_rate.tolist(), dist.ReduceOp.SUM)
        if not info.is_main:
            return
        losses = {f"train/{k}": v / world for k, v in zip(keys, sums[: len(keys)])}
        values = dict(losses)
        values["train/lr"] = self._step_lr
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            values["train/grad_norm"] = float(gn)
        values["train/epoch"] = self.step / self.steps_per_epoch
        values["perf/samples_per_s"] = sum(rates)
        for r, v in enumerate(rates):
            values[f"perf/samples_per_s_rank{r}"] = v
        values["perf/data_time_fraction"] = sums[len(keys)] / world
        values["data/skipped_samples"] = sums[len(keys) + 1]
        values[mem_tag] = mem_max
        if self.cfg.train.precision == "fp16":
            skipped = int(self.engine.skipped_steps)
            values["train/skipped_steps"] = float(skipped)
            scale = self.engine._get_optimizer_loss_scale()
            if scale is not None:
                values["train/loss_scale"] = float(scale)
            if skipped > self.skipped_seen:
                log.warning("fp16: %d optimizer step(s) skipped on overflow since the last log line (%d in all); "
                            "loss scale now %s", skipped - self.skipped_seen, skipped, scale)
                self.skipped_seen = skipped
        values.update({f"reduction/{k}": v for k, v in self.schedule_values.items()})
        budgets = out.get("budgets") if out else None
        if budgets is not None:  # adaptive budget: this rank's last batch, per stage
            per_stage = budgets.float()
            for s, (mean, std) in enumerate(zip(per_stage.mean(0).tolist(), per_stage.std(0, unbiased=False).tolist())):
                values[f"tokens/budget_{s}_mean"], values[f"tokens/budget_{s}_std"] = mean, std
        tokens = out.get("tokens_per_layer") if out else None
        if tokens:
            for i, n in enumerate(tokens):
                values[f"tokens/layer_{i:02d}"] = float(n)
        monitor.scalars(self.step, values)
        parts = " ".join(f"{k[len('train/loss_'):]} {v:.3f}" for k, v in losses.items() if k.startswith("train/loss_"))
        log.info("step %d/%d ep %.2f | loss %.4f (%s) | lr %.2e | %.1f samples/s, data %.0f%% | grad %s | %s %.2f GiB%s",
                 self.step, self.total_steps, values["train/epoch"], losses.get("train/loss", float("nan")), parts,
                 values["train/lr"], values["perf/samples_per_s"], 100 * values["perf/data_time_fraction"],
                 f"{values['train/grad_norm']:.3f}" if "train/grad_norm" in values else "n/a", mem_tag.split("/")[1],
                 mem_max, f" | tokens {'>'.join(str(int(n)) for n in tokens)}" if tokens else "")

    def _image_grid(self, monitor: Monitor, batch: dict, out: dict) -> None:
        if not self.info.is_main or batch is None or out is None:
            return
        kept = out.get("kept_patches")
        if kept is None or not self.patch_size:
            return
        grid = kept_patch_grid(batch["image"], kept, int(self.patch_size), self.cfg.train.image_grid_samples)
        monitor.image(self.step, "tokens/kept_patches", grid)
        monitor.text(self.step, "tokens/kept_patches_captions",
                     "\n\n".join(batch["text"][: self.cfg.train.image_grid_samples]))


class _Interval:
    """Sums over the steps between two log lines (this rank)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.data_time = 0.0
        self.steps = self.micro = self.samples = 0
        self.losses: dict[str, float] = {}

    def add(self, out: dict, n: int) -> None:
        self.micro += 1
        self.samples += n
        for k, v in out.items():
            if k == "loss" or k.startswith("loss_"):
                self.losses[k] = self.losses.get(k, 0.0) + float(v.detach().float())


def _autobatch(cfg: ExperimentConfig, info: DistInfo, run_dir: Path) -> ExperimentConfig:
    """``cfg`` with the micro-batch ``autobatch`` finds. Every rank probes its own device and
    all take the smallest answer; the result goes to ``RUN_DIR/autobatch.json``, which a
    resumed run reuses so that its batch matches its checkpoints."""
    path = run_dir / "autobatch.json"
    if path.is_file():
        result = ab.AutobatchResult.from_dict(json.loads(path.read_text())["result"])
        log.info("autobatch: reusing %s", path)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")))
        result = ab.search(cfg, device=info.device, world_size=info.world_size, local_world_size=local_world)
        agreed = torch.tensor([result.micro_batch], dtype=torch.int64)
        if info.backend == "nccl":
            agreed = agreed.to(info.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        result.micro_batch = int(agreed.item())
    new_cfg, change = ab.apply_rule(cfg, result.micro_batch)
    if info.is_main and not path.is_file():
        atomic_write_text(path, json.dumps({"result": result.to_dict(), "rule": cfg.autobatch.rule,
                                            "change": change}, indent=1))
    dist.barrier()
    log.info("autobatch (budget %s): %s; %s", cfg.autobatch.budget, ab.describe(result), change)
    return new_cfg


def train(cfg: ExperimentConfig) -> str:
    """Run (or resume) a pre-training; returns 'finished', 'stopped' or 'preempted'."""
    check_precision(cfg.train.precision)  # before any process group or model exists
    started = time.time()
    info = setup_distributed()
    run_dir = Path(cfg.train.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    _setup_logging(run_dir, info.rank)
    trainer = None
    try:
        if cfg.autobatch.budget != "off":
            cfg = _autobatch(cfg, info, run_dir)
        if info.is_main:
            save_config(cfg, run_dir / "config.yaml")
        trainer = Trainer(cfg, info)
        state = trainer.train()
    except (Exception, KeyboardInterrupt) as err:  # any rank that fails says so; the launcher stops the others
        _write_failure(run_dir, started, trainer.step if trainer else 0, err, info.rank)
        raise
    dist.barrier()
    dist.destroy_process_group()
    return state
