"""Measurements of one configuration, made by running its model: a forward pass (budgets) and
one training step (costs). FLOPs (torch.utils.flop_counter) and bytes saved for backward are
deterministic, so they compare across machines."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import ExperimentConfig
from pipeline.device import pick_device
from pipeline.models import build_model
from pipeline.train.autobatch import probe_batch
from pipeline.train.profile import measure_step

MIN_BATCH = 2  # ITM's hard negatives need two samples


def _model(cfg: ExperimentConfig, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    model.train()  # the training graph: reduction, momentum encoder and every loss
    return model


def forward_budget(cfg: ExperimentConfig, batch: int = MIN_BATCH, device: torch.device | None = None) -> dict:
    """``{"token_layers", "tokens_per_layer", "flops"}`` of one training-mode forward pass:
    the vision tokens summed over the ViT's layers and the forward FLOPs per sample. With an
    adaptive budget the tokens are each image's own (the mean over the batch), not the padded
    length the batch computes: a budget matched by token-layers is one of equal mean tokens,
    and its padding shows in the FLOPs."""
    device = device or pick_device()
    model = _model(cfg, device)
    data = probe_batch(cfg, batch, device, torch.float32)
    torch.manual_seed(1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(data)
    tokens = [float(n) for n in out.get("mean_tokens_per_layer") or out.get("tokens_per_layer") or []]
    return {"token_layers": sum(tokens), "tokens_per_layer": tokens,
            "flops": int(counter.get_total_flops()) // batch}


def step_cost(cfg: ExperimentConfig, device: torch.device | None = None) -> dict:
    """One training step (forward + backward, all losses) at the config's micro-batch:
    ``{"flops_per_sample", "activation_bytes", "micro_batch"}``; the activations are the bytes
    autograd saves for backward, weights excluded."""
    device = device or pick_device()
    batch = max(MIN_BATCH, cfg.data.batch_size)
    model = _model(cfg, device)
    data = probe_batch(cfg, batch, device, torch.float32)
    torch.manual_seed(1)
    cost = measure_step(lambda: model(data)["loss"].backward(), model.parameters())
    return {"flops_per_sample": cost.flops / batch, "activation_bytes": cost.activation_bytes, "micro_batch": batch}
