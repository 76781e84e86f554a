"""Small pieces every model file uses (timm's ``layers/`` in spirit): the gradient-checkpoint
call, the BERT config of a local directory or of config keys, BERT's initialiser, the row copy
into a grown vocabulary, and the precision names' dtypes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, BertConfig

# The precision names of the configs (``train.precision``, ``model.llm.dtype``).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def checkpointed(enabled: bool, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, recomputed in backward instead of storing its activations when
    ``enabled`` and autograd is recording (torch's non-reentrant checkpoint, as timm's
    ``checkpoint_seq``). Callers pass ``enabled = self.grad_checkpointing and self.training``."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def bert_config(pretrained: str | None, overrides: dict, key: str, any_model: bool = False):
    """The config of a local BERT directory (``config.json``; ``any_model``: any transformers
    encoder such as RoBERTa) with ``overrides`` applied, or a random BERT's from ``overrides``.

    Raises:
        FileNotFoundError naming ``{key}.pretrained`` when the directory has no ``config.json``.
    """
    if pretrained is not None:
        if not (Path(pretrained) / "config.json").is_file():
            raise FileNotFoundError(f"{key}.pretrained: no config.json in {pretrained}")
        return (AutoConfig if any_model else BertConfig).from_pretrained(pretrained, **overrides)
    return BertConfig(**overrides)


def bert_init(module: nn.Module, std: float) -> None:
    """BERT's initialisation (``BertPreTrainedModel._init_weights``), for ``Module.apply``."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def resize_pos_embed(value: torch.Tensor, own: torch.Tensor) -> torch.Tensor | None:
    """A ViT's ``[1, 1 + g*g, D]`` position embedding fitted to ``own`` ``[1, 1 + h*h, D]`` of
    another resolution (fine-tuning at 384 px from a 256 px pre-training, as ALBEF's
    ``interpolate_pos_embed``): the patch grid resampled bicubically by timm, [CLS] kept.
    None when the two are not square grids of one width."""
    from timm.layers import resample_abs_pos_embed

    if value.dim() != 3 or own.dim() != 3 or value.shape[::2] != own.shape[::2]:
        return None
    old, new = round((value.shape[1] - 1) ** 0.5), round((own.shape[1] - 1) ** 0.5)
    if old * old + 1 != value.shape[1] or new * new + 1 != own.shape[1]:
        return None
    return resample_abs_pos_embed(value.float(), [new, new], [old, old], num_prefix_tokens=1).to(own.dtype)


def grow_rows(value: torch.Tensor, own: torch.Tensor) -> torch.Tensor | None:
    """A checkpoint tensor ``[V, ...]`` fitted into a model tensor ``[V', ...]`` with ``V < V'``
    (a vocabulary grown by added tokens, e.g. BLIP's [DEC] and [ENC]): the checkpoint's rows,
    then the model's own remaining rows, in ``own``'s dtype. None when the shapes are not so related."""
    if value.dim() >= 1 and value.shape[1:] == own.shape[1:] and value.shape[0] < own.shape[0]:
        return torch.cat([value.to(own.dtype), own[value.shape[0]:]])
    return None
