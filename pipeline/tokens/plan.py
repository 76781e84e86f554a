"""A reduction config becomes a per-layer plan for one ViT encoder.

``method`` is a config value (``none | elip | tome | evit``): the encoder runs whatever plan it
is given, so comparing methods is one loop over that value. Where each method acts:

- ELIP reduces *before* layer ``l`` to ``int(ratio * M)`` of the ``M`` original patches (plus
  [CLS] and one fused token); with ``budget_tau > 0`` to the fewest reaching that attention mass
  per image, at most ``int(ratio * M)`` (:mod:`pipeline.tokens.budget`);
- EViT reduces *inside* layer ``l``, after attention, keeping ``ceil(rate * (N-1))``;
- ToMe merges ``r[l]`` tokens inside every layer, after attention;
- FLIP drops all but a random ``int(flip_keep * M)`` patches before layer 0, in training only
  (``flip_eval: true`` masks in evaluation too), none in the last ``unmasked_steps`` steps.

Settings that follow training progress (EViT's keep-rate warm-up, FLIP's unmasked tuning) are
resolved by passing a :class:`Progress` to :func:`build_plan`; without one the plan holds the
target values (what evaluation and a model used outside training see).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.tokens import flip
from pipeline.tokens.reducers import IDENTITY, ElipBudget, ElipSelect, EvitFuse, PatchDrop, Reducer, TomeMerge
from pipeline.tokens.schedule import evit_keep_rate
from pipeline.tokens.tome import r_schedule

METHODS = ("none", "elip", "tome", "evit", "flip")
ELIP_MODES = ("lookahead", "reuse")
KEEP_RATE_SCHEDULES = ("cosine", "constant")

# ELIP's published layouts: (layers reduced before, keep ratios of the original patch count).
ELIP_VIT_B16 = ((2, 4, 10), (0.9, 0.65, 0.4))  # ALBEF / BLIP, 12 layers
ELIP_METER_B32 = ((2, 4, 9), (0.9, 0.7, 0.45))  # METER's CLIP ViT-B/32
EVIT_DEFAULT_LAYERS = (3, 6, 9)  # EViT's reduction locations for a 12-layer ViT


@dataclass
class ReductionConfig:
    """The ``reduction`` section of a vision encoder's config.

    ``layers``/``ratios`` default to ELIP's ViT-B/16 layout (ELIP) or EViT's 3/6/9 (EViT) for a
    12-layer encoder; other depths must set ``layers`` explicitly.
    """

    method: str = "none"
    elip_mode: str = "reuse"
    layers: list[int] | None = None
    ratios: list[float] | None = None
    lam: float = 0.8
    keep_rate: float = 0.7
    r: int | list[int] = 10
    inflect: float = 0.0
    prop_attn: bool = True
    # EViT: keep rate 1.0 -> keep_rate along a cosine (the official adjust_keep_rate), spans as
    # fractions of the training steps (official recipe: start at epoch 10, shrink over 100, of 300)
    keep_rate_schedule: str = "cosine"
    shrink_start: float = 10 / 300
    shrink_length: float = 100 / 300
    # ELIP's adaptive per-image budget: 0 = the fixed ratios; else keep the fewest patches
    # reaching this attention mass, at most each layer's ratio, at least budget_min_ratio * M
    budget_tau: float = 0.0
    budget_min_ratio: float = 0.1
    # FLIP
    flip_keep: float = 0.5
    flip_eval: bool = False
    unmasked_steps: int = 0

    @property
    def reduces(self) -> bool:
        """Whether this config asks for any reduction (``method`` other than ``none``)."""
        return self.method != "none"


@dataclass(frozen=True)
class Progress:
    """Where training is: ``step`` optimizer steps done of ``total_steps``."""

    step: int
    total_steps: int


@dataclass(frozen=True)
class ReductionPlan:
    """What each of the ``L`` layers does: ``before[l]`` runs before layer ``l``, ``inside[l]``
    between its attention and its MLP (both length ``L``, :data:`~pipeline.tokens.reducers.IDENTITY`
    where nothing happens)."""

    method: str
    elip_mode: str
    lam: float
    prop_attn: bool
    keep_rate: float | None = None  # EViT's rate at this progress (None: not EViT)
    before: tuple[Reducer, ...] = field(default=())
    inside: tuple[Reducer, ...] = field(default=())

    @property
    def num_layers(self) -> int:
        return len(self.before)

    @property
    def text_guided(self) -> bool:
        """Whether the encoder wants the text [CLS] (ELIP): the backbone runs its text encoder first."""
        return any(step.text_guided for step in self.before)

    @property
    def elip_keep(self) -> tuple[int | None, ...]:
        """Non-[CLS] tokens kept before each layer (None: no selection there)."""
        return tuple(step.keep if isinstance(step, ElipSelect) else None for step in self.before)

    def tokens_per_layer(self, num_patches: int) -> list[int]:
        """Sequence length entering each layer, [CLS] included, for ``num_patches`` patches."""
        n, lengths = num_patches + 1, []
        for before, inside in zip(self.before, self.inside):
            n = before.tokens_after(n)
            lengths.append(n)
            n = inside.tokens_after(n)
        return lengths


def _reduce_layers(cfg: ReductionConfig, num_layers: int, default: tuple[int, ...] | None) -> list[int]:
    layers = list(cfg.layers) if cfg.layers is not None else None
    if layers is None:
        if num_layers != 12 or default is None:
            raise ValueError(
                f"reduction.layers: the {cfg.method} default layout is for a 12-layer ViT; "
                f"set reduction.layers for this {num_layers}-layer encoder"
            )
        layers = list(default)
    for i, layer in enumerate(layers):
        if not isinstance(layer, int) or not 1 <= layer < num_layers:
            raise ValueError(
                f"reduction.layers[{i}]={layer!r} out of range 1..{num_layers - 1} for a {num_layers}-layer ViT"
            )
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"reduction.layers must be strictly increasing, got {layers}")
    return layers


def build_plan(cfg: ReductionConfig, num_layers: int, num_patches: int, progress: Progress | None = None) -> ReductionPlan:
    """Validate ``cfg`` against an encoder of ``num_layers`` layers and ``num_patches`` patches,
    with the scheduled settings at ``progress`` (None: their targets).

    Raises:
        ValueError naming the offending key and value.
    """
    if cfg.method not in METHODS:
        raise ValueError(f"reduction.method={cfg.method!r}; expected one of {METHODS}")
    if cfg.elip_mode not in ELIP_MODES:
        raise ValueError(f"reduction.elip_mode={cfg.elip_mode!r}; expected one of {ELIP_MODES}")
    if not 0.0 <= cfg.lam <= 1.0:
        raise ValueError(f"reduction.lam={cfg.lam} must be in [0, 1]")
    if cfg.keep_rate_schedule not in KEEP_RATE_SCHEDULES:
        raise ValueError(f"reduction.keep_rate_schedule={cfg.keep_rate_schedule!r}; expected one of {KEEP_RATE_SCHEDULES}")
    for key in ("shrink_start", "shrink_length"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ValueError(f"reduction.{key}={getattr(cfg, key)} must be a fraction of the training steps in [0, 1]")
    if cfg.unmasked_steps < 0:
        raise ValueError(f"reduction.unmasked_steps={cfg.unmasked_steps} must be >= 0")
    before: list[Reducer] = [IDENTITY] * num_layers
    inside: list[Reducer] = [IDENTITY] * num_layers
    keep_rate = None

    if cfg.method == "elip":
        layers = _reduce_layers(cfg, num_layers, ELIP_VIT_B16[0])
        ratios = list(cfg.ratios) if cfg.ratios is not None else list(ELIP_VIT_B16[1])
        if len(ratios) != len(layers):
            raise ValueError(f"reduction.ratios {ratios} needs one ratio per layer in {layers}")
        for i, ratio in enumerate(ratios):
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"reduction.ratios[{i}]={ratio} must be in (0, 1]")
        if not 0.0 <= cfg.budget_tau <= 1.0:
            raise ValueError(f"reduction.budget_tau={cfg.budget_tau} must be in [0, 1] (0: fixed ratios)")
        if cfg.budget_tau > 0 and not 0.0 <= cfg.budget_min_ratio <= min(ratios):
            raise ValueError(f"reduction.budget_min_ratio={cfg.budget_min_ratio} must be in [0, {min(ratios)}] "
                             f"(the smallest of reduction.ratios)")
        for layer, ratio in zip(layers, ratios):
            keep = int(ratio * num_patches)
            if cfg.budget_tau > 0:
                before[layer] = ElipBudget(keep, cfg.budget_tau, int(cfg.budget_min_ratio * num_patches))
            else:
                before[layer] = ElipSelect(keep)
    elif cfg.method == "evit":
        if not 0.0 < cfg.keep_rate <= 1.0:
            raise ValueError(f"reduction.keep_rate={cfg.keep_rate} must be in (0, 1]")
        keep_rate = cfg.keep_rate
        if progress is not None and cfg.keep_rate_schedule == "cosine":
            keep_rate = evit_keep_rate(progress.step, progress.total_steps, cfg.keep_rate,
                                       cfg.shrink_start, cfg.shrink_length)
        for layer in _reduce_layers(cfg, num_layers, EVIT_DEFAULT_LAYERS):
            inside[layer] = EvitFuse(keep_rate)
    elif cfg.method == "flip":
        if not 0.0 < cfg.flip_keep <= 1.0:
            raise ValueError(f"reduction.flip_keep={cfg.flip_keep} must be in (0, 1]")
        tuning = progress is not None and progress.step >= progress.total_steps - cfg.unmasked_steps
        if not tuning:
            before[0] = PatchDrop(flip.num_kept(num_patches, cfg.flip_keep), train_only=not cfg.flip_eval)
    elif cfg.method == "tome":
        inside = [TomeMerge(r) if r > 0 else IDENTITY for r in r_schedule(num_layers, cfg.r, cfg.inflect)]

    return ReductionPlan(
        method=cfg.method,
        elip_mode=cfg.elip_mode,
        lam=cfg.lam,
        prop_attn=cfg.prop_attn,
        keep_rate=keep_rate,
        before=tuple(before),
        inside=tuple(inside),
    )

