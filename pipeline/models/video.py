"""The frozen image encoder of EVLGen, and its video variant (temporal contextualization).

Images: any timm ViT (``vit_*``, ``eva_giant_patch14_clip_224`` ...), weights from a local file,
every parameter frozen, run without gradient; its ``forward_features`` (layer-normed [CLS] +
patch tokens) feed the connector.

Video (``video.num_frames > 0``): ``[B, T, 3, H, W]`` frames run through the same frozen blocks
as ``B*T`` images, but in every block, between attention and MLP, each spatial position
attends across the ``T`` frames (:class:`TemporalAttention`: small trainable projections, a
learned frame-position table, output added through a scalar gate initialised to 0, so the
pretrained image model is exactly unchanged at the start). The frame tokens are then averaged
over ``T``. Only the temporal parameters of the encoder train, so the frozen blocks run with
autograd on (their activations carry the temporal modules' gradients).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.vit import VitConfig, create_timm_vit


@dataclass
class VideoConfig:
    """``model.video``: ``num_frames`` 0 = image model; T > 0 adds temporal modules for up to
    T frames. ``dim``/``heads``: width and heads of the temporal attention (a bottleneck)."""

    num_frames: int = 0
    dim: int = 256
    heads: int = 4


class TemporalAttention(nn.Module):
    """Attention across frames at every spatial position, gated into the residual stream.

    ``forward(x [B*T, N, D], T) -> [B*T, N, D]`` equals ``x`` while ``gate == 0``.
    """

    def __init__(self, width: int, dim: int, heads: int, max_frames: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.video.dim={dim} must be divisible by model.video.heads={heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.frame_embed = nn.Parameter(torch.zeros(max_frames, width))
        nn.init.normal_(self.frame_embed, std=0.02)
        self.qkv = nn.Linear(width, 3 * dim)
        self.proj = nn.Linear(dim, width)
        self.gate = nn.Parameter(torch.zeros(1))  # shape [1]: DeepSpeed cannot broadcast 0-dim parameters

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        BT, N, D = x.shape
        T = num_frames
        if T > self.frame_embed.shape[0]:
            raise ValueError(f"{T} frames, but model.video.num_frames={self.frame_embed.shape[0]}")
        B = BT // T
        h = x.view(B, T, N, D).transpose(1, 2).reshape(B * N, T, D)  # one sequence of T per position
        h = self.norm(h) + self.frame_embed[:T].to(h.dtype)
        q, k, v = self.qkv(h).view(B * N, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B * N, T, -1)
        o = self.proj(o).view(B, N, T, D).transpose(1, 2).reshape(BT, N, D)
        return x + self.gate.to(o.dtype) * o


def _is_eva(vit: nn.Module) -> bool:
    from timm.models.eva import Eva

    return isinstance(vit, Eva)


class FrozenVision(nn.Module):
    """Frozen timm ViT, optionally with temporal modules.

    ``forward(images [B, 3, H, W] or frames [B, T, 3, H, W]) -> [B, N, D]`` (frames averaged).
    Attributes: ``embed_dim`` D, ``num_prefix_tokens`` ([CLS] count), ``num_tokens`` N.
    """

    def __init__(self, cfg: VitConfig, video: VideoConfig, init_seed: int = 0):
        super().__init__()
        self.cfg = cfg
        # A frozen encoder without a weights file must come out the same in every process that
        # builds it (training ranks, evaluation): it is not in checkpoints that leave out frozen weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.vit = create_timm_vit(cfg)
        self.vit.requires_grad_(False)
        self.embed_dim = self.vit.num_features
        self.num_prefix_tokens = self.vit.num_prefix_tokens
        self.num_tokens = self.vit.patch_embed.num_patches + self.num_prefix_tokens
        self.temporal = None
        if video.num_frames > 0:
            for i, blk in enumerate(self.vit.blocks):
                if not all(hasattr(blk, a) for a in ("norm1", "attn", "norm2", "mlp", "drop_path1", "drop_path2")):
                    raise ValueError(f"model.vision.model_name={cfg.model_name!r}: block {i} is not a timm ViT/EVA "
                                     "block; the video variant needs one to insert temporal attention")
            self.temporal = nn.ModuleList(
                TemporalAttention(self.embed_dim, video.dim, video.heads, video.num_frames) for _ in self.vit.blocks)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vit.eval()  # frozen: no dropout / drop-path, as BLIP-2 keeps its ViT in eval mode
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 4:
            images = images.unsqueeze(1)
        if images.dim() != 5:
            raise ValueError(f"expected images [B, 3, H, W] or frames [B, T, 3, H, W], got {tuple(images.shape)}")
        B, T = images.shape[:2]
        frames = images.flatten(0, 1)
        if self.temporal is None:
            with torch.no_grad():
                tokens = self.vit.forward_features(frames)
        else:
            tokens = self._temporal_features(frames, T)
        return tokens.view(B, T, *tokens.shape[1:]).mean(dim=1)

    def _temporal_features(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """timm's ``forward_features`` with :class:`TemporalAttention` between attention and MLP."""
        vit = self.vit
        x = vit.patch_embed(x)
        if _is_eva(vit):
            x, rope = vit._pos_embed(x)
        else:
            x, rope = vit.patch_drop(vit._pos_embed(x)), None
        x = vit.norm_pre(x)
        mixed = getattr(vit, "rope_mixed", False) and rope is not None
        for i, (blk, temporal) in enumerate(zip(vit.blocks, self.temporal)):
            h = blk.norm1(x)
            if rope is not None or _is_eva(vit):
                a = blk.attn(h, rope=rope[i] if mixed else rope)
                a = a if blk.gamma_1 is None else blk.gamma_1 * a
            else:
                a = blk.ls1(blk.attn(h))
            x = temporal(x + blk.drop_path1(a), T)
            m = blk.mlp(blk.norm2(x))
            if hasattr(blk, "ls2"):
                m = blk.ls2(m)
            elif blk.gamma_2 is not None:
                m = blk.gamma_2 * m
            x = x + blk.drop_path2(m)
        return vit.norm(x)
