"""Test helpers for the loader and trainer: tiny webdataset shards and a toy model.

The toy model is registered as ``toy`` when this module is imported; trainer subprocesses
import it through the experiment config's ``imports: [tests.helpers_train]``.
"""
from __future__ import annotations

import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models import register_model

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
          "white": (240, 240, 240), "black": (15, 15, 15), "purple": (140, 30, 160), "orange": (250, 140, 20)}


def _jpeg(color, size: int, seed: int) -> bytes:
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color)[None, None, :] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(out: str | Path, *, shards: int = 4, per_shard: int = 8, size: int = 32, prefix: str = "toy",
                 corrupt_keys: tuple[str, ...] = (), captions_per_image: int = 1, manifest: bool = True,
                 key_prefix: str = "") -> list[str]:
    """Write ``shards`` tars of ``per_shard`` samples (KEY.jpg, KEY.txt, KEY.json) and manifest.json.

    Keys are ``{key_prefix}{shard:03d}{index:03d}``; the caption names the image colour. Samples whose key
    is in ``corrupt_keys`` get a truncated JPEG.
    """
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    entries, paths = [], []
    for s in range(shards):
        path = out / f"{prefix}-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                key = f"{key_prefix}{s:03d}{i:03d}"
                color = names[(s * per_shard + i) % len(names)]
                jpg = _jpeg(COLORS[color], size, seed=s * 1000 + i)
                if key in corrupt_keys:
                    jpg = jpg[: len(jpg) // 3]
                caps = [f"a photo of a {color} square"] + [f"a {color} picture number {k}" for k in range(1, captions_per_image)]
                sink.write({"__key__": key, "jpg": jpg, "txt": caps[0],
                            "json": json.dumps({"captions": caps, "source": "toy"}).encode()})
        entries.append({"name": path.name, "num_samples": per_shard})
        paths.append(str(path))
    if manifest:
        (out / "manifest.json").write_text(json.dumps({"num_samples": shards * per_shard, "shards": entries}))
    return paths


# --------------------------------------------------------------------------- toy model


@dataclass
class ToyConfig:
    name: str = "toy"
    patch_size: int = 8
    dim: int = 16
    vocab: int = 512
    keep_ratio: float = 0.5  # "vision tokens" kept after the first layer
    dropout: float = 0.1  # exercises RNG restore on resume


def _word_ids(text: str, vocab: int) -> list[int]:
    return [zlib.crc32(w.encode()) % vocab for w in text.split()] or [0]


class ToyModel(nn.Module):
    """Patch conv -> keep the top-k patch tokens by norm -> mean -> ITC against an EmbeddingBag."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.patch = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.norm = nn.LayerNorm(cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.text = nn.EmbeddingBag(cfg.vocab, cfg.dim, mode="mean")
        self.frozen = nn.Linear(cfg.dim, cfg.dim)  # a frozen part, like a frozen LLM
        self.frozen.requires_grad_(False)
        self.drop = nn.Dropout(cfg.dropout)
        self.logit_scale = nn.Parameter(torch.tensor([2.0]))  # shape [1]: see the trainer's 0-dim check
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_progress(self, step: int, total_steps: int) -> dict[str, float]:
        """A scheduled setting (FollowsProgress): the trainer logs it as reduction/progress."""
        return {"progress": step / total_steps}

    def encode_text(self, texts: list[str], device) -> torch.Tensor:
        ids = [_word_ids(t, self.cfg.vocab) for t in texts]
        flat = torch.tensor([i for x in ids for i in x], device=device)
        offsets = torch.tensor([0] + [len(x) for x in ids[:-1]], device=device).cumsum(0)
        return F.normalize(self.frozen(self.text(flat, offsets)), dim=-1)

    def encode_image(self, image: torch.Tensor):
        tokens = self.patch(image).flatten(2).transpose(1, 2)  # [B, P, D]
        B, P, _ = tokens.shape
        k = max(1, int(P * self.cfg.keep_ratio))
        keep = tokens.float().norm(dim=-1).topk(k, dim=1).indices
        kept = torch.zeros(B, P, dtype=torch.bool, device=image.device)
        kept[torch.arange(B, device=image.device)[:, None], keep] = True
        sel = tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        feat = self.proj(self.drop(self.norm(sel.mean(1))))
        return F.normalize(feat, dim=-1), kept, [P, k]

    def forward(self, batch: dict) -> dict:
        img, kept, tokens = self.encode_image(batch["image"])
        txt = self.encode_text(batch["text"], img.device).to(img.dtype)
        logits = self.logit_scale.exp() * img @ txt.t()
        target = torch.arange(len(logits), device=logits.device)
        i2t = F.cross_entropy(logits.float(), target)
        t2i = F.cross_entropy(logits.float().t(), target)
        return {"loss": (i2t + t2i) / 2, "loss_i2t": i2t.detach(), "loss_t2i": t2i.detach(),
                "tokens_per_layer": tokens, "kept_patches": kept}


register_model("toy", ToyConfig, ToyModel)


def toy_config_dict(run_dir: str, train_shards: str, **sections) -> dict:
    """A plain experiment config for the toy model (sections update the defaults)."""
    cfg = {
        "imports": ["tests.helpers_train"],
        "model": {"name": "toy"},
        "data": {"train_shards": train_shards, "image_size": 32, "batch_size": 4, "workers": 0,
                 "shuffle_buffer": 8, "randaugment": True},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_lr": 1e-3, "warmup_steps": 2, "epochs": 2},
        "train": {"run_dir": run_dir, "deepspeed": "zero2", "precision": "fp32", "log_every": 1,
                  "checkpoint_every": 0, "image_grid_every": 2,
                  "exclude_frozen_parameters": True},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo_root()) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["OMP_NUM_THREADS"] = "1"
    return env


def train_subprocess(config: str, run: Path, train: Path, test: Path, *overrides: str):
    """``python -m pipeline.train`` on one rank with the tests' quiet settings (no checkpoints
    but the last, logs every 10 steps); fails the test with the run's output if it fails."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pipeline.train", "--config", config, f"train.run_dir={run}",
           f"data.train_shards={train}", f"eval.shards={test}", "data.workers=1", "train.log_every=10",
           "train.checkpoint_every=0", "eval.every_epochs=0", *overrides]
    r = subprocess.run(cmd, cwd=repo_root(), env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def save_checkpoint(run: Path, state: dict, step: int = 1) -> Path:
    """A complete checkpoint of ``state`` (a model's state dict) in ``run``, as the trainer lays one
    out for a single rank; returns the tag directory. What ``train.init_from`` and evaluation read."""
    tag = Path(run) / "checkpoints" / f"step_{step}"
    tag.mkdir(parents=True)
    torch.save({"module": state}, tag / "mp_rank_00_model_states.pt")
    (tag / "meta.json").write_text(json.dumps({"step": step}))
    (Path(run) / "checkpoints" / "latest").write_text(tag.name)
    return tag


def fit_batch(model: nn.Module, batch: dict, steps: int, lr: float = 3e-3) -> float:
    """AdamW on one batch for ``steps`` steps (a head that learns can fit it); the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = model(batch)["loss"]
        loss.backward()
        opt.step()
    return loss.item()
