"""Measurements of one configuration, made by running its model: a forward pass (budgets) and
one training step (costs). FLOPs (torch.utils.flop_counter) and bytes saved for backward are
deterministic, so they compare across machines.

A budget is measured on what the run will start from: the weights of ``train.init_from`` once
that run has a checkpoint, and images from ``data.train_shards`` when they can be read. An
adaptive budget keeps the tokens the trained attention favours on real images; on random
weights and noise images it keeps something else (a tau matched there kept nearly every image
at its upper bound once the warm-started model saw the synthetic shapes). What was used is
returned as ``measured_on`` so that a budget matched on random weights is measured again once
the warm start exists."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import ExperimentConfig
from pipeline.device import pick_device
from pipeline.data.loader import build_eval_loader
from pipeline.models import build_model
from pipeline.models.weights import find_checkpoint, init_from
from pipeline.train.autobatch import probe_batch
from pipeline.train.profile import measure_step

MIN_BATCH = 2  # ITM's hard negatives need two samples


def start_weights(cfg: ExperimentConfig) -> str:
    """The checkpoint a run of ``cfg`` starts from (``train.init_from``'s newest complete one),
    or ``"init"`` when it has none (yet)."""
    if not cfg.train.init_from:
        return "init"
    try:
        return str(find_checkpoint(cfg.train.init_from))
    except FileNotFoundError:
        return "init"  # not trained yet (a sweep's warm start): measured on the initialisation, and said so


def _model(cfg: ExperimentConfig, device: torch.device, start: bool = False) -> tuple[torch.nn.Module, str]:
    """The model in training mode and which weights it has: with ``start``, those the run
    starts from (:func:`start_weights`), else the seeded initialisation."""
    torch.manual_seed(0)
    model = build_model(cfg.model)
    weights = start_weights(cfg) if start else "init"
    if weights != "init":
        init_from(model, weights)
    model.to(device).train()  # the training graph: reduction, momentum encoder and every loss
    return model, weights


def _images(cfg: ExperimentConfig, batch: int, device: torch.device) -> tuple[dict, str]:
    """``batch`` real training samples (un-augmented, in shard order) and their source, or the
    probe's random batch when ``data.train_shards`` cannot be read here."""
    try:
        first = next(iter(build_eval_loader(cfg.data.train_shards, image_size=cfg.data.image_size,
                                            batch_size=batch, max_words=cfg.data.max_words)))
    except (OSError, ValueError, StopIteration):
        return probe_batch(cfg, batch, device, torch.float32), "random"
    if first["image"].shape[0] < batch:
        return probe_batch(cfg, batch, device, torch.float32), "random"
    return {"image": first["image"].to(device), "text": [c[0] for c in first["captions"]], "meta": first["meta"],
            "epoch_progress": 1.0}, cfg.data.train_shards


def forward_budget(cfg: ExperimentConfig, batch: int = MIN_BATCH, device: torch.device | None = None) -> dict:
    """``{"token_layers", "tokens_per_layer", "flops", "measured_on"}`` of one training-mode forward pass:
    the vision tokens summed over the ViT's layers and the forward FLOPs per sample. With an
    adaptive budget the tokens are each image's own (the mean over the batch), not the padded
    length the batch computes: a budget matched by token-layers is one of equal mean tokens,
    and its padding shows in the FLOPs. ``measured_on``: ``{"weights", "images"}`` used (see the
    module's docstring)."""
    device = device or pick_device()
    model, weights = _model(cfg, device, start=True)
    data, images = _images(cfg, batch, device)
    torch.manual_seed(1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(data)
    tokens = [float(n) for n in out.get("mean_tokens_per_layer") or out.get("tokens_per_layer") or []]
    return {"token_layers": sum(tokens), "tokens_per_layer": tokens,
            "flops": int(counter.get_total_flops()) // batch, "measured_on": {"weights": weights, "images": images}}


def step_cost(cfg: ExperimentConfig, device: torch.device | None = None) -> dict:
    """One training step (forward + backward, all losses) at the config's micro-batch:
    ``{"flops_per_sample", "activation_bytes", "micro_batch"}``; the activations are the bytes
    autograd saves for backward, weights excluded."""
    device = device or pick_device()
    batch = max(MIN_BATCH, cfg.data.batch_size)
    model, _ = _model(cfg, device)
    data = probe_batch(cfg, batch, device, torch.float32)
    torch.manual_seed(1)
    cost = measure_step(lambda: model(data)["loss"].backward(), model.parameters())
    return {"flops_per_sample": cost.flops / batch, "activation_bytes": cost.activation_bytes, "micro_batch": batch}
