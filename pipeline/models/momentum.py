"""What ALBEF and BLIP share: momentum (teacher) encoders, feature queues and the ITC loss.

A backbone subclasses :class:`MomentumContrast`, builds ``visual_encoder``, ``text_encoder``,
``vision_proj`` and ``text_proj``, then calls :meth:`MomentumContrast.init_momentum`. The
teacher ViT runs unpruned, as in the official ELIP code (``teacher_reduction: none``), or on the
patches the student's ViT kept to its last layer, from its input on (``same``: ELIP, EViT, FLIP;
no fused token; the batch's smallest count, see :func:`pipeline.tokens.flip.kept_index`); the
queues hold every rank's features.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models.losses import concat_all_gather, itc_loss, positive_targets
from pipeline.models.pairing import encode_pair
from pipeline.models.text import TextConfig, TextOutput, tokenize
from pipeline.models.vit import VisionEncoder, VisionOutput, VitConfig
from pipeline.tokens import flip
from pipeline.tokens.plan import ReductionConfig

TEACHER_REDUCTIONS = ("none", "same")


@dataclass
class MomentumConfig:
    """The ``model:`` keys every :class:`MomentumContrast` backbone has (ALBEF's and BLIP's
    configs extend it): the encoders, the ITC projection width and temperature, the feature
    queue, the teacher's EMA momentum and the distillation weight.

    ``positives_key`` (retrieval fine-tuning: ``image_id``) names the ``KEY.json`` field whose
    equal values mark captions of one image: ITC then counts all of them, in the batch and the
    queue, as positives and ITM never draws them as negatives (ALBEF's and BLIP's retrieval
    ``idx``); empty = only a sample's own caption (pre-training).
    """

    name: str = ""
    vision: VitConfig = field(default_factory=VitConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256
    temp: float = 0.07
    queue_size: int = 65536
    momentum: float = 0.995
    alpha: float = 0.4
    distill: bool = True
    teacher_reduction: str = "none"
    positives_key: str = ""


class ItcStep(NamedTuple):
    """What :meth:`MomentumContrast.itc_step` hands the backbone's other losses.

    ids, mask: ``[B, L]`` the tokenized captions; text: the student's (maybe pruned)
    :class:`TextOutput`; vision: the student ViT's output; image_embeds_m: ``[B, N, D]`` the
    teacher ViT's tokens; loss: the ITC loss; sim_i2t, sim_t2i: ``[B, B+Q]``; alpha: the
    distillation weight of this step.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    text: TextOutput
    vision: VisionOutput
    image_embeds_m: torch.Tensor
    loss: torch.Tensor
    sim_i2t: torch.Tensor
    sim_t2i: torch.Tensor
    alpha: float
    idx: torch.Tensor | None = None  # [B] image ids (model.positives_key), else None


class MomentumContrast(nn.Module):
    """Base of ALBEF and BLIP: tokenizer call, momentum update, queues, ITC with distillation.

    Its config is a :class:`MomentumConfig`.
    """

    def init_momentum(self, cfg) -> None:
        """Create the teacher copies (no gradient), the ``[E, Q]`` queues and the temperature."""
        # shape [1], not ALBEF's 0-dim: DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes
        self.temp = nn.Parameter(torch.tensor([cfg.temp]))
        if cfg.teacher_reduction not in TEACHER_REDUCTIONS:
            raise ValueError(f"model.teacher_reduction={cfg.teacher_reduction!r}; expected one of {TEACHER_REDUCTIONS}")
        if cfg.teacher_reduction == "same" and cfg.vision.reduction.method in ("none", "tome"):
            raise ValueError(
                f"model.teacher_reduction=same needs a method that keeps patches (elip, evit, flip), "
                f"not model.vision.reduction.method={cfg.vision.reduction.method}"
            )
        self.visual_encoder_m = VisionEncoder(replace(cfg.vision, reduction=ReductionConfig(), checkpoint=None))
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        self.model_pairs = [
            (self.visual_encoder, self.visual_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_encoder, self.text_encoder_m),
            (self.text_proj, self.text_proj_m),
        ]
        self._ema_shadow: list[torch.Tensor] | None = None  # fp32 EMA state in half precision
        self.copy_params()
        q = cfg.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, q), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, q), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if cfg.positives_key:  # only then: pre-training checkpoints keep their keys
            self.register_buffer("idx_queue", torch.full((q,), -100, dtype=torch.long))

    def tokenize(self, texts: list[str], device: torch.device):
        return tokenize(self.tokenizer, texts, self.cfg.text.max_tokens, device)

    def positive_ids(self, batch: dict) -> torch.Tensor | None:
        """``[B]`` int64 image ids from ``batch["meta"]``'s ``model.positives_key`` (None when unset)."""
        key = self.cfg.positives_key
        if not key:
            return None
        metas = batch.get("meta")
        if metas is None:
            raise ValueError(f"model.positives_key={key!r} needs each sample's KEY.json (batch['meta'])")
        bad = [m.get("key", i) for i, m in enumerate(metas) if not isinstance(m.get(key), (int, str))]
        if bad:
            raise ValueError(f"samples {bad[:3]}: KEY.json has no {key!r} (model.positives_key; "
                             "the caption sources write image_id)")
        return torch.tensor([_id_number(m[key]) for m in metas], device=batch["image"].device)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)

    def encode_pair(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
        """:func:`pipeline.models.pairing.encode_pair` with this backbone's encoders."""
        return encode_pair(self.visual_encoder, self.text_encoder.encode, images, ids, mask, self.image_first)

    def itc_step(self, batch: dict) -> ItcStep:
        """The student and teacher passes and the ITC loss of one pre-training step.

        Args:
            batch: ``image`` ``[B, 3, H, W]``, ``text`` list of B captions, optional
                ``epoch_progress`` (ramps the distillation weight over the first epoch).
        """
        images, device = batch["image"], batch["image"].device
        alpha = self.distill_alpha(batch)
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

        tok = self.tokenize(batch["text"], device)
        ids, mask = tok.input_ids, tok.attention_mask
        text, vision = self.encode_pair(images, ids, mask)
        image_feat = F.normalize(self.vision_proj(vision.tokens[:, 0]), dim=-1)
        text_feat = F.normalize(self.text_proj(text.hidden[:, 0]), dim=-1)

        with torch.no_grad():
            self._momentum_update()
            patches = None
            if self.cfg.teacher_reduction == "same" and vision.kept_patches is not None:
                patches = flip.kept_index(vision.kept_patches)
            image_embeds_m = self.visual_encoder_m(images, patches=patches).tokens
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
            text_m = self.text_encoder_m.encode(ids, mask, index=text.index)  # the same tokens
            text_feat_m = F.normalize(self.text_proj_m(text_m.hidden[:, 0]), dim=-1)
        idx = self.positive_ids(batch)
        loss, sim_i2t, sim_t2i = self.contrast(image_feat, text_feat, image_feat_m, text_feat_m, alpha, idx)
        return ItcStep(ids, mask, text, vision, image_embeds_m, loss, sim_i2t, sim_t2i, alpha, idx)

    @staticmethod
    def outputs(step: ItcStep, **losses: torch.Tensor) -> dict:
        """``forward``'s dict: ``loss`` = ITC + ``losses`` summed, each part detached as
        ``loss_<name>``, and the ViT's and text encoder's token statistics."""
        parts = {"itc": step.loss, **losses}
        out = {"loss": sum(parts.values())}
        out.update({f"loss_{name}": value.detach() for name, value in parts.items()})
        out.update(tokens_per_layer=step.vision.tokens_per_layer, kept_patches=step.vision.kept_patches,
                   text_tokens_per_layer=step.text.tokens_per_layer, budgets=step.vision.budgets,
                   mean_tokens_per_layer=step.vision.mean_tokens_per_layer)
        return out

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieval: ``[B, 3, H, W]`` -> ``(image_embeds [B, N', D], image_feat [B, E])``;
        vision-only selection (no caption to guide ELIP)."""
        embeds = self.visual_encoder(images).tokens
        return embeds, F.normalize(self.vision_proj(embeds[:, 0]), dim=-1)

    def distill_alpha(self, batch: dict) -> float:
        """The distillation weight, ramped up over the first epoch (``batch['epoch_progress']``)."""
        if not self.cfg.distill:
            return 0.0
        return self.cfg.alpha * min(1.0, float(batch.get("epoch_progress", 1.0)))

    @torch.no_grad()
    def copy_params(self) -> None:
        """Reset the momentum encoders to the online weights (at init and after a warm start)."""
        for model, model_m in self.model_pairs:
            model_m.load_state_dict(model.state_dict())
            model_m.requires_grad_(False)
        self._ema_shadow = None

    @torch.no_grad()
    def _momentum_update(self) -> None:
        """EMA of the online weights into the momentum encoders.

        In bf16/fp16 an update of ``(1 - m) * (p - p_m)`` is far below the half type's
        resolution (bf16: 2^-8 relative) and would round away, freezing the teacher; so the EMA
        runs on fp32 shadows of the momentum weights (local partitions only under ZeRO-3) and
        only the result is cast down. The shadows start from the weights at the first update
        (also after a resume): one rounding, not one per step.
        """
        m = self.cfg.momentum
        pairs = [(p, p_m) for model, model_m in self.model_pairs
                 for p, p_m in zip(model.parameters(), model_m.parameters())]
        # Under ZeRO-3 a parameter's data is only its local partition (``ds_tensor``); both
        # copies are partitioned alike, so the update runs shard by shard.
        local = [(p.ds_tensor, p_m.ds_tensor) if hasattr(p, "ds_tensor") else (p.data, p_m.data) for p, p_m in pairs]
        if local[0][1].dtype == torch.float32:
            for src, dst in local:
                dst.mul_(m).add_(src.to(dst.dtype), alpha=1.0 - m)
            return
        if self._ema_shadow is None:
            self._ema_shadow = [dst.float() for _, dst in local]
        for (src, dst), shadow in zip(local, self._ema_shadow):
            shadow.mul_(m).add_(src.float(), alpha=1.0 - m)
            dst.copy_(shadow)

    @torch.no_grad()
    def _enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Push every rank's ``[B, E]`` momentum features (and ``[B]`` image ids) into the ring-buffer queues."""
        image_feat, text_feat = concat_all_gather(image_feat), concat_all_gather(text_feat)
        q = self.image_queue.shape[1]
        idx = (self.queue_ptr + torch.arange(image_feat.shape[0], device=image_feat.device)) % q
        self.image_queue[:, idx] = image_feat.T.to(self.image_queue.dtype)
        self.text_queue[:, idx] = text_feat.T.to(self.text_queue.dtype)
        if ids is not None:
            self.idx_queue[idx] = concat_all_gather(ids)
        self.queue_ptr[0] = (self.queue_ptr[0] + image_feat.shape[0]) % q

    def contrast(
        self,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        image_feat_m: torch.Tensor,
        text_feat_m: torch.Tensor,
        alpha: float,
        idx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITC against the teacher's batch + queue features, then enqueue the teacher's.

        Args:
            image_feat, text_feat: ``[B, E]`` normalised student features.
            image_feat_m, text_feat_m: ``[B, E]`` normalised teacher features (no gradient).
            alpha: distillation weight (0 = one-hot targets).
            idx: ``[B]`` image ids: every key of the same image is a positive (None: the diagonal).
        Returns:
            ``(loss, sim_i2t [B, B+Q], sim_t2i [B, B+Q])``.
        """
        with torch.no_grad():
            # contrastive arithmetic in fp32, like the queues it is compared with
            image_feat_m, text_feat_m, temp = image_feat_m.float(), text_feat_m.float(), self.temp.float()
            image_feat_all = torch.cat([image_feat_m.T, self.image_queue.clone()], dim=1)
            text_feat_all = torch.cat([text_feat_m.T, self.text_queue.clone()], dim=1)
            if idx is None:
                targets = torch.zeros(len(image_feat), image_feat_all.shape[1], device=image_feat.device)
                targets.fill_diagonal_(1)
            else:
                targets = positive_targets(idx, torch.cat([idx, self.idx_queue]))
            i2t_targets = t2i_targets = targets
            if alpha > 0:
                i2t_targets = alpha * F.softmax(image_feat_m @ text_feat_all / temp, dim=1) + (1 - alpha) * targets
                t2i_targets = alpha * F.softmax(text_feat_m @ image_feat_all / temp, dim=1) + (1 - alpha) * targets
        result = itc_loss(image_feat, text_feat, image_feat_all, text_feat_all, self.temp, i2t_targets, t2i_targets)
        self._enqueue(image_feat_m, text_feat_m, idx)
        return result


def check_objectives(objectives: list[str], known: tuple[str, ...], required: str | None = None) -> None:
    """Refuse an empty ``model.objectives``, an unknown name or one without ``required``."""
    unknown = [o for o in objectives if o not in known]
    if not objectives or unknown or (required and required not in objectives):
        raise ValueError(f"model.objectives={list(objectives)}: expected a non-empty subset of {list(known)}"
                         + (f" containing {required!r}" if required else "")
                         + (f"; unknown {unknown}" if unknown else ""))


def same_image(idx: torch.Tensor | None) -> torch.Tensor | None:
    """``[B]`` image ids -> ``[B, B]`` bool, True where two samples show the same image."""
    return None if idx is None else idx[:, None] == idx[None, :]


def _id_number(value: int | str) -> int:
    """An image id as an int64 shared by every rank: a non-negative int as is, anything else
    (Flickr30K file stems) a stable 62-bit hash above every COCO id."""
    if isinstance(value, int) and value >= 0:
        return value
    digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 2) | (1 << 62)
