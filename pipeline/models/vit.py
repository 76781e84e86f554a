"""One ViT image encoder (timm blocks and weights) that runs any token-reduction plan.

The blocks are timm's own modules; only their forward is re-sequenced here so that a layer
can (a) expose the one attention row a reduction needs without leaving the fused SDPA kernel,
(b) add ToMe's proportional-attention bias, and (c) merge or prune tokens between attention
and MLP. With ``method: none`` the output equals timm's ``forward_features``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import json
import re
import sys

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.layers import checkpointed
from pipeline.models.weights import CheckpointError, check_key_account
from pipeline.tokens import elip, flip, tome
from pipeline.tokens.plan import Progress, ReductionConfig, ReductionPlan, build_plan
from pipeline.tokens.reducers import IDENTITY

# open_clip's files first: a hub snapshot may hold them next to a transformers-format model.safetensors
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                "pytorch_model.bin", "model.pth")
# what a ViT may leave unused from a file: classifier heads (the encoder has none)
VIT_MAY_LEAVE = ("head.*", "head_dist.*", "fc_norm.*")


@dataclass
class VitConfig:
    """The ``vision`` section of a backbone config.

    ``model_name`` is any timm ViT (``vit_base_patch16_224``, ``deit_base_patch16_224``,
    ``vit_base_patch32_clip_224``...); ``timm_kwargs`` override its architecture (tiny test
    encoders: ``{depth: 4, embed_dim: 64, num_heads: 2}``); ``checkpoint`` is a local weights file
    or a directory holding one (timm, DeiT, OpenAI/OpenCLIP formats), never a hub download.
    """

    model_name: str = "vit_base_patch16_224"
    image_size: int = 224
    checkpoint: str | None = None
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    timm_kwargs: dict = field(default_factory=dict)
    reduction: ReductionConfig = field(default_factory=ReductionConfig)


class VisionOutput(NamedTuple):
    """What :class:`VisionEncoder` returns. A named tuple, not a dataclass: ZeRO-3 hooks the
    tensors of a module's output to gather the module's parameters for backward, and it looks
    inside tuples, lists and dicts only.

    tokens: ``[B, N_out, D]`` final (layer-normed) tokens, [CLS] first.
    tokens_per_layer: sequence length entering each layer.
    kept_patches: ``[B, M]`` bool, the original patches that survive as themselves to the last
        layer (ELIP, EViT, FLIP); ``None`` when no patch is dropped or the method merges (ToMe).
    budgets: ``[B, S]`` long, each image's own budget at each of the S adaptive-budget stages;
        ``None`` without ``budget_tau``. With it the batch is padded to each stage's largest
        budget (``tokens_per_layer`` counts the padded length, what is computed); the padding
        is masked in attention and comes out as exact zero rows of ``tokens``
        (:func:`pipeline.tokens.budget.real_tokens`).
    mean_tokens_per_layer: the real tokens entering each layer, averaged over the batch's
        images (equal to ``tokens_per_layer`` without padding).
    """

    tokens: torch.Tensor
    tokens_per_layer: list[int]
    kept_patches: torch.Tensor | None
    budgets: torch.Tensor | None = None
    mean_tokens_per_layer: list[float] | None = None


def resolve_weights_file(path: str) -> str:
    """A weights file given a file or a directory holding one of :data:`WEIGHT_FILES`."""
    p = Path(path)
    if p.is_file():
        return str(p)
    if p.is_dir():
        for name in WEIGHT_FILES:
            if (p / name).is_file():
                return str(p / name)
        raise FileNotFoundError(f"vision.checkpoint: no weights file ({', '.join(WEIGHT_FILES)}) in {path}")
    raise FileNotFoundError(f"vision.checkpoint: {path} does not exist")


def create_timm_vit(cfg: VitConfig) -> nn.Module:
    """The timm ViT named by ``cfg`` without its classifier, weights from ``cfg.checkpoint``."""
    kwargs = dict(num_classes=0, img_size=cfg.image_size, drop_path_rate=cfg.drop_path_rate, **cfg.timm_kwargs)
    vit = timm.create_model(cfg.model_name, pretrained=False, **kwargs)
    if cfg.checkpoint is not None:
        load_vit_weights(vit, cfg.checkpoint)
    return vit


def load_vit_weights(vit: nn.Module, path: str) -> None:
    """Load a timm, DeiT, OpenAI CLIP or open_clip weights file into a timm ViT, with a full key
    account (:func:`~pipeline.models.weights.check_key_account`).

    timm's own ``checkpoint_filter_fn`` of the model's family converts the layout (DeiT's
    ``model`` wrapper, OpenAI / open_clip CLIP state dicts) and resizes the position embedding.
    Expected to differ: the classifier heads and the blocks past the model's depth (METER keeps
    11 of CLIP's 12). A transformers ``ViTModel`` / ``CLIPVisionModel`` snapshot has no timm
    conversion, so it is refused by the same account, with a hint.
    """
    file = resolve_weights_file(path)
    try:
        state = timm.models.load_state_dict(file, weights_only=True)
    except Exception as err:  # noqa: BLE001 - safetensors' header errors, a cut zip, a pickle with code
        raise CheckpointError(f"weights file {file} (vision.checkpoint) cannot be read, refused (nothing "
                              f"was executed): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    filter_fn = getattr(sys.modules[type(vit).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, vit)
    missing, unused = vit.load_state_dict(state, strict=False)
    depth = len(vit.blocks)
    dropped = sorted({int(m.group(1)) for k in unused if (m := re.match(r"blocks\.(\d+)\.", k)) and int(m.group(1)) >= depth})
    check_key_account(f"vision.checkpoint={file}", missing, unused,
                      may_leave=[*VIT_MAY_LEAVE, *(f"blocks.{i}.*" for i in dropped)],
                      hint=_format_hint(Path(file)))


def _format_hint(file: Path) -> str:
    """Why a file may not fit: a transformers-format snapshot, which timm cannot convert."""
    config = file.parent / "config.json"
    if not config.is_file():
        return ""
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError):
        return ""
    return (f"{config} says model_type={model_type!r}: a transformers-format snapshot, which timm's "
            "checkpoint_filter_fn does not convert; use the timm, OpenAI CLIP or open_clip weights of the model")


def _cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """Head-averaged attention of one query row over the non-[CLS] keys.

    Args:
        q: ``[B, H, 1, d]`` query row; k: ``[B, H, N, d]`` keys; bias: ``[B, 1, 1, N]`` or None.
    Returns:
        ``[B, N-1]``.
    """
    logits = (q * scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
    if bias is not None:
        logits = logits + bias
    return logits.float().softmax(dim=-1).mean(dim=1)[:, 0, 1:]


class VisionEncoder(nn.Module):
    """timm ViT + a :class:`~pipeline.tokens.plan.ReductionPlan`.

    Attributes:
        embed_dim: token width D. patch_size: pixels per patch side. num_patches: M.
    """

    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.cfg = cfg
        vit = create_timm_vit(cfg)
        if vit.num_prefix_tokens != 1 or vit.cls_token is None or getattr(vit, "dynamic_img_size", False):
            raise ValueError(
                f"vision.model_name={cfg.model_name!r}: token reduction needs exactly one [CLS] prefix token"
            )
        for i, blk in enumerate(vit.blocks):
            if not (hasattr(blk, "attn") and hasattr(blk.attn, "qkv") and hasattr(blk, "mlp")):
                raise ValueError(f"vision.model_name={cfg.model_name!r}: block {i} is not a timm pre-norm ViT block")
        # timm's modules and parameters, owned directly (same state-dict names as timm's ViT):
        # under ZeRO-3 a module's own parameters are gathered only inside its forward.
        self.patch_embed, self.cls_token, self.pos_embed = vit.patch_embed, vit.cls_token, vit.pos_embed
        self.pos_drop, self.patch_drop, self.norm_pre = vit.pos_drop, vit.patch_drop, vit.norm_pre
        self.blocks, self.norm = vit.blocks, vit.norm
        self.no_embed_class = vit.no_embed_class
        self.embed_dim = vit.embed_dim
        self.patch_size = vit.patch_embed.patch_size[0]
        self.num_patches = vit.patch_embed.num_patches
        self.plan: ReductionPlan = build_plan(cfg.reduction, len(self.blocks), self.num_patches)
        self.grad_checkpointing = cfg.grad_checkpointing

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_progress(self, step: int, total_steps: int) -> dict[str, float]:
        """Re-plan for training step ``step`` of ``total_steps`` (EViT's keep-rate warm-up, FLIP's
        unmasked tuning); returns the scheduled values now in force, for logging."""
        self.plan = build_plan(self.cfg.reduction, len(self.blocks), self.num_patches, Progress(step, total_steps))
        values = {}
        if self.plan.keep_rate is not None:
            values["keep_rate"] = self.plan.keep_rate
        if self.plan.method == "flip":
            values["flip_masking"] = float(self.plan.before[0] is not IDENTITY)
        return values

    @property
    def text_guided(self) -> bool:
        """Whether :meth:`forward` wants ``text_cls`` (ELIP): the backbone encodes text first."""
        return self.plan.text_guided

    def expected_tokens_per_layer(self) -> list[int]:
        return self.plan.tokens_per_layer(self.num_patches)

    # -- one layer ---------------------------------------------------------------------------
    def _block(
        self,
        i: int,
        x: torch.Tensor,
        size: torch.Tensor | None,
        ids: torch.Tensor | None,
        guide: torch.Tensor | None,
        want_scores: bool,
        valid: torch.Tensor | None = None,
    ):
        """Layer ``i`` with its reduction.

        Args:
            x: ``[B, N, D]``; size: ``[B, N, 1]`` (ToMe) or None; ids: ``[B, N-1]`` original patch
            index per token (-1 = fused/merged/padding) or None; guide: ``[B, D]`` text-fused [CLS]
            used as the query of the returned scores (None = the layer's own [CLS]);
            valid: ``[B, N]`` bool, the real tokens of a padded batch (their keys alone are
            attended) or None.
        Returns:
            ``(x, size, ids, scores)``; scores is ``[B, N-1]`` [CLS]-query attention over the
            layer's input tokens when ``want_scores`` (ELIP reuse), else None.
        """
        blk, plan = self.blocks[i], self.plan
        attn = blk.attn
        B, N, _ = x.shape
        h = blk.norm1(x)
        qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = tome.proportional_attention_bias(size) if plan.prop_attn else None
        if bias is not None:
            bias = bias.to(q.dtype)
        if valid is not None:  # padding's keys are never attended: each image sees its own tokens
            key_bias = torch.zeros(B, 1, 1, N, dtype=q.dtype, device=q.device)
            key_bias = key_bias.masked_fill(~valid[:, None, None, :], float("-inf"))
            bias = key_bias if bias is None else bias + key_bias
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if self.training else 0.0
        )
        o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(B, N, attn.attn_dim))))
        x = x + blk.drop_path1(blk.ls1(o))

        scores = None
        step = plan.inside[i]
        if want_scores or step.needs_scores:
            q_row = q[:, :, :1]
            if guide is not None:
                # The text-fused [CLS] as one extra query row of this layer: no extra pass.
                q_row = attn.qkv(blk.norm1(guide))[:, : attn.attn_dim]
                q_row = attn.q_norm(q_row.reshape(B, attn.num_heads, 1, attn.head_dim))
            scores = _cls_attention(q_row, k, attn.scale, bias)
        r = step(x, scores=scores, keys=k, size=size)
        x, size = r.x, r.size  # no padding step runs inside a layer (the budget is ELIP's, before one)
        ids = None if step.merges else _track(ids, r.kept, r.fused)
        if step.needs_scores:
            scores = None  # spent on this layer's own reduction
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return x, size, ids, scores

    def _run(self, i, x, size, ids, guide, want_scores, valid):
        return checkpointed(self.grad_checkpointing and self.training, self._block, i, x, size, ids, guide,
                            want_scores, valid)

    # -- ELIP selection ------------------------------------------------------------------------
    def _stage_end(self, start: int) -> int:
        later = [j for j in range(start + 1, self.plan.num_layers) if self.plan.before[j].needs_scores]
        return later[0] if later else self.plan.num_layers

    @torch.no_grad()
    def _lookahead_scores(self, x: torch.Tensor, start: int, text_cls: torch.Tensor | None,
                          valid: torch.Tensor | None = None) -> torch.Tensor:
        """The official ELIP look-ahead: run the stage starting at ``start`` on all tokens (the real
        ones of a padded batch: ``valid``), [CLS] replaced by the text-fused [CLS], and return its
        last layer's [CLS] attention ``[B, N-1]``."""
        x = torch.cat([elip.fuse_cls(x[:, 0], text_cls, self.plan.lam).unsqueeze(1), x[:, 1:]], dim=1)
        end = self._stage_end(start)
        for j in range(start, end):
            x, _, _, scores = self._block(j, x, None, None, None, want_scores=j == end - 1, valid=valid)
        return scores

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, 1+M, D]``: patches, [CLS] and position embeddings (timm's order)."""
        x = self.patch_embed(images)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        if self.no_embed_class:  # DeiT-3 / big_vision: the position table has no [CLS] entry
            return self.pos_drop(torch.cat([cls, x + self.pos_embed], dim=1))
        return self.pos_drop(torch.cat([cls, x], dim=1) + self.pos_embed)

    # -- whole encoder -------------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor,
        text_cls: torch.Tensor | None = None,
        track_patches: bool = False,
        patches: torch.Tensor | None = None,
    ) -> VisionOutput:
        """Encode images, reducing tokens as planned.

        Args:
            images: ``[B, 3, H, W]`` normalised pixels.
            text_cls: ``[B, D]`` text [CLS] guiding ELIP; None = vision-only selection (lam = 1).
            track_patches: also return which original patches survive (visualisation).
            patches: ``[B, K]`` patch positions to keep at the input (a teacher seeing the
                student's kept patches); None = all.
        Returns:
            :class:`VisionOutput`.
        """
        plan = self.plan
        x = self.norm_pre(self.patch_drop(self._embed(images)))
        B, M = x.shape[0], x.shape[1] - 1
        ids = torch.arange(M, device=x.device).expand(B, M) if track_patches else None
        if patches is not None:
            x = flip.keep_patches(x, patches)
            ids = _track(ids, patches, fused=False)
        size, scores, lengths, budgets, valid, means = None, None, [], [], None, []
        reuse = plan.elip_mode == "reuse"
        for i in range(plan.num_layers):
            step = plan.before[i]
            if step.acts(x.shape[1]) and (self.training or not step.train_only):
                if step.needs_scores and plan.elip_mode == "lookahead":
                    scores = self._lookahead_scores(x, i, text_cls, valid)
                r = step(x, scores=scores, size=size, **({"valid": valid} if step.pads else {}))
                x, size = r.x, r.size
                ids = None if step.merges else _track(ids, r.kept, r.fused)
                if r.counts is not None:
                    budgets.append(r.counts)
                if step.pads:
                    valid = r.valid
            lengths.append(x.shape[1])
            means.append(float(x.shape[1]) if valid is None else valid.sum(dim=1).float().mean())
            after = plan.before[i + 1] if i + 1 < plan.num_layers else IDENTITY
            guide = None
            if reuse and after.text_guided and text_cls is not None:
                guide = elip.fuse_cls(x[:, 0], text_cls, plan.lam)
            x, size, ids, scores = self._run(i, x, size, ids, guide, reuse and after.needs_scores, valid)
        kept_patches = None
        if ids is not None and x.shape[1] - 1 < M:
            kept_patches = torch.zeros(B, M + 1, dtype=torch.bool, device=x.device)
            kept_patches.scatter_(1, ids + 1, True)  # fused tokens (-1) land in column 0
            kept_patches = kept_patches[:, 1:]
        tokens = self.norm(x)
        if valid is not None:  # padding leaves as exact zero rows (budget.real_tokens finds them)
            tokens = tokens * valid.unsqueeze(-1).to(tokens.dtype)
        return VisionOutput(tokens, lengths, kept_patches, torch.stack(budgets, dim=1) if budgets else None,
                            [float(m) for m in means])


def _track(ids: torch.Tensor | None, kept: torch.Tensor | None, fused: bool = True) -> torch.Tensor | None:
    """Original patch ids after a selection: the kept positions (-1 for a kept slot of -1:
    padding or the fused token), then -1 for the fused token when the step appends one."""
    if ids is None or kept is None:
        return ids
    ids = ids.gather(1, kept.clamp_min(0)).masked_fill(kept < 0, -1)
    return torch.cat([ids, ids.new_full((ids.shape[0], 1), -1)], dim=1) if fused else ids
