"""TensorBoard and log output of the trainer (rank 0 writes; values are reduced before)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from pipeline.data.transforms import denormalize

log = logging.getLogger("pipeline.train")


def peak_memory_gb(device: torch.device) -> tuple[str, float]:
    """(tag, GiB): CUDA max allocated on a GPU, the process' peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return "mem/cuda_max_allocated_gb", torch.cuda.max_memory_allocated(device) / 2**30
    return "mem/peak_rss_gb", _proc_status_kb("VmHWM") / 2**20


def _proc_status_kb(field: str) -> float:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    try:  # not Linux: ru_maxrss (kB on Linux, bytes on macOS)
        import resource

        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    except (ImportError, OSError):
        return 0.0


def kept_patch_grid(images: torch.Tensor, kept: torch.Tensor, patch_size: int, n: int = 4) -> torch.Tensor:
    """[3, H', W'] grid: top row the images, bottom row with dropped patches dimmed and the
    kept ones outlined (the ELIP paper's Figure 5 style)."""
    from torchvision.utils import make_grid

    if images.dim() == 5:  # [B, 2, 3, H, W] pairs: the model's kept patches run over the B*2 images in that order
        images = images.flatten(0, 1)
    images = denormalize(images[:n].detach().float().cpu())
    kept = kept[:n].detach().cpu().bool()
    B, _, H, W = images.shape
    gh, gw = H // patch_size, W // patch_size
    if kept.shape[1] != gh * gw:
        raise ValueError(f"kept_patches has {kept.shape[1]} patches, expected {gh}x{gw} for patch {patch_size}")
    mask = kept.view(B, 1, gh, gw).float()
    mask = mask.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    mask = torch.nn.functional.pad(mask, (0, W - gw * patch_size, 0, H - gh * patch_size))
    highlighted = images * (0.25 + 0.75 * mask)
    # outline kept patches in green: pixels where the mask changes inside the patch grid
    edge = torch.zeros_like(mask)
    edge[..., :, 1:] += (mask[..., :, 1:] != mask[..., :, :-1]).float()
    edge[..., 1:, :] += (mask[..., 1:, :] != mask[..., :-1, :]).float()
    edge = (edge > 0).float()
    green = torch.tensor([0.1, 0.9, 0.2]).view(1, 3, 1, 1)
    highlighted = highlighted * (1 - edge) + green * edge
    return make_grid(torch.cat([images, highlighted]), nrow=B, padding=2, pad_value=1.0)


class Monitor:
    """Rank 0: TensorBoard (``RUN_DIR/tensorboard``), ``metrics.jsonl`` and log lines."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.metrics_path = run_dir / "metrics.jsonl"
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events after the resume step (from a run that went on after its last
        # checkpoint) are dropped, so the curves do not overlap; the resume step's own stay.
        # A fresh start drops everything: what is there came from a run killed before its
        # first checkpoint, and is logged again.
        purge = start_step + 1 if start_step > 0 else 0
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        if self.metrics_path.exists():  # same for the JSON lines
            rows = [r for r in self.metrics_path.read_text().splitlines() if r.strip()]
            keep = [r for r in rows if json.loads(r).get("step", 0) < purge]
            self.metrics_path.write_text("".join(r + "\n" for r in keep))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **{k: round(float(v), 6) for k, v in values.items()}}) + "\n")

    def image(self, step: int, tag: str, grid: torch.Tensor) -> None:
        if self.enabled:
            self.writer.add_image(tag, grid, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
