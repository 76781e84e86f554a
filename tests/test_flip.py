"""FLIP patch dropout, EViT's keep-rate schedule and the teacher's reduction."""
import math

import pytest
import torch

from pipeline.config import load_config
from pipeline.models import build_model
from pipeline.models.contracts import FollowsProgress
from pipeline.tokens import flip
from pipeline.tokens.plan import Progress, ReductionConfig, build_plan
from pipeline.tokens.reducers import IDENTITY, PatchDrop
from pipeline.tokens.schedule import evit_keep_rate
from tests.helpers_backbones import synthetic_batch
from tests.test_vit import tiny_encoder

FLIP = ReductionConfig(method="flip", flip_keep=0.5)


def _patch_rows(enc, images):
    """The kept patches of each image, by index, from the encoder's tracked ids."""
    out = enc(images, track_patches=True)
    return out, [row.nonzero()[:, 0].tolist() for row in out.kept_patches]


def test_flip_keeps_half_the_patches_and_cls():
    enc = tiny_encoder(FLIP).train()  # 64 px, patch 16: 16 patches
    out, rows = _patch_rows(enc, torch.randn(4, 3, 64, 64))
    assert out.tokens.shape == (4, 1 + 8, 64)
    assert out.tokens_per_layer == [9, 9, 9, 9]
    assert all(len(r) == 8 for r in rows)
    assert build_plan(ReductionConfig(method="flip", flip_keep=0.25), 12, 196).tokens_per_layer(196)[0] == 1 + 49


def test_flip_subsets_differ_per_sample_and_per_step_and_repeat_under_the_seed():
    enc = tiny_encoder(FLIP).train()
    images = torch.randn(8, 3, 64, 64)
    torch.manual_seed(1)
    _, first = _patch_rows(enc, images)
    _, second = _patch_rows(enc, images)
    assert len({tuple(r) for r in first}) > 1  # per sample
    assert first != second  # per step
    torch.manual_seed(1)
    _, again = _patch_rows(enc, images)
    assert again == first


def test_flip_kept_tokens_are_the_embedded_patches_and_get_gradients():
    x = torch.randn(3, 1 + 10, 4, requires_grad=True)
    kept = flip.random_keep(3, 10, 4)
    y = flip.keep_patches(x, kept)
    assert torch.equal(y[:, 0], x[:, 0])
    for b in range(3):
        assert torch.equal(y[b, 1:], x[b, 1 + kept[b]])
    y.sum().backward()
    got = x.grad[:, 1:, 0] != 0
    expected = torch.zeros(3, 10, dtype=torch.bool).scatter_(1, kept, True)
    assert torch.equal(got, expected) and bool((x.grad[:, 0] != 0).all())


def test_flip_gradient_reaches_the_encoder_through_kept_tokens():
    enc = tiny_encoder(FLIP).train()
    (enc(torch.randn(2, 3, 64, 64)).tokens[:, 0] @ torch.randn(64)).sum().backward()  # a plain sum of a LayerNorm output has no gradient
    assert enc.patch_embed.proj.weight.grad.abs().sum() > 0


def test_flip_eval_sees_all_tokens_unless_configured():
    images = torch.randn(2, 3, 64, 64)
    enc = tiny_encoder(FLIP).eval()
    none = tiny_encoder(ReductionConfig()).eval()
    with torch.no_grad():
        assert torch.equal(enc(images).tokens, none(images).tokens)
    masked = tiny_encoder(ReductionConfig(method="flip", flip_keep=0.5, flip_eval=True)).eval()
    assert masked(images).tokens.shape[1] == 9


def test_flip_unmasked_steps_end_training_without_masking():
    enc = tiny_encoder(ReductionConfig(method="flip", flip_keep=0.5, unmasked_steps=10)).train()
    assert isinstance(enc, FollowsProgress)
    assert enc.set_progress(89, 100) == {"flip_masking": 1.0}
    assert enc(torch.randn(1, 3, 64, 64)).tokens.shape[1] == 9
    assert enc.set_progress(90, 100) == {"flip_masking": 0.0}
    assert enc.plan.before[0] is IDENTITY
    assert enc(torch.randn(1, 3, 64, 64)).tokens.shape[1] == 17


def test_flip_bad_keep_named():
    with pytest.raises(ValueError, match="reduction.flip_keep=0.0"):
        build_plan(ReductionConfig(method="flip", flip_keep=0.0), 12, 196)
    assert isinstance(build_plan(FLIP, 12, 196).before[0], PatchDrop)


def _official_adjust_keep_rate(iters, epoch, warmup_epochs, total_epochs, iters_per_epoch, base_keep_rate,
                               max_keep_rate=1):
    """youweiliang/evit helpers.adjust_keep_rate, as called per iteration by its train_one_epoch."""
    if epoch < warmup_epochs:
        return 1
    if epoch >= total_epochs:
        return base_keep_rate
    total_iters = iters_per_epoch * (total_epochs - warmup_epochs)
    iters = iters - iters_per_epoch * warmup_epochs
    return base_keep_rate + (max_keep_rate - base_keep_rate) * (math.cos(iters / total_iters * math.pi) + 1) * 0.5


def test_evit_schedule_matches_the_official_formula_in_steps():
    per_epoch, epochs = 7, 300  # the official recipe: shrink from epoch 10 over 100 epochs of 300
    total = per_epoch * epochs
    for it in list(range(0, total, 37)) + [69, 70, 71, 769, 770, 771, total - 1]:
        ours = evit_keep_rate(it, total, 0.7, 10 / 300, 100 / 300)
        ref = _official_adjust_keep_rate(it, it // per_epoch, 10, 110, per_epoch, 0.7)
        assert ours == pytest.approx(ref, abs=1e-9), it
    assert evit_keep_rate(0, total, 0.7, 10 / 300, 100 / 300) == 1.0
    assert evit_keep_rate(total // 2, total, 0.7, 10 / 300, 100 / 300) == 0.7


def test_evit_plan_follows_progress_and_targets_without_it():
    cfg = ReductionConfig(method="evit", layers=[1, 2], keep_rate=0.6)
    assert build_plan(cfg, 4, 16).keep_rate == 0.6  # outside training: the target, as before
    assert build_plan(cfg, 4, 16, Progress(0, 300)).keep_rate == 1.0
    mid = build_plan(cfg, 4, 16, Progress(60, 300))
    assert mid.keep_rate == pytest.approx(evit_keep_rate(60, 300, 0.6, 10 / 300, 100 / 300))
    assert 0.6 < mid.keep_rate < 1.0 and mid.inside[1].rate == mid.keep_rate
    constant = ReductionConfig(method="evit", layers=[1, 2], keep_rate=0.6, keep_rate_schedule="constant")
    assert build_plan(constant, 4, 16, Progress(0, 300)).keep_rate == 0.6
    enc = tiny_encoder(cfg).train()
    assert enc.set_progress(0, 300) == {"keep_rate": 1.0}
    assert enc(torch.randn(1, 3, 64, 64)).tokens_per_layer == [17, 17, 17, 17]
    with pytest.raises(ValueError, match="reduction.keep_rate_schedule='linear'"):
        build_plan(ReductionConfig(method="evit", keep_rate_schedule="linear"), 12, 196)


def test_kept_index_takes_the_batch_smallest_count_in_raster_order():
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    assert flip.kept_index(mask).tolist() == [[0, 2], [1, 2]]


@pytest.mark.parametrize("method", ["flip", "elip"])
def test_teacher_reduction_same_sees_the_students_kept_patches(method):
    cfg = load_config("tiny_albef_elip", [f"model.vision.reduction.method={method}", "model.teacher_reduction=same"])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    seen = {}

    def hook(module, args, kwargs, output):
        seen["patches"], seen["tokens"] = kwargs["patches"], output.tokens

    model.visual_encoder_m.register_forward_hook(hook, with_kwargs=True)
    batch = synthetic_batch(4)
    student = {}
    model.visual_encoder.register_forward_hook(lambda m, a, o: student.update(kept=o.kept_patches))
    model(batch)
    expected = flip.kept_index(student["kept"])
    assert torch.equal(seen["patches"], expected)
    assert seen["tokens"].shape[1] == 1 + expected.shape[1] < 1 + model.visual_encoder.num_patches
    if method == "flip":  # the exact FLIP subset, nothing given up
        assert torch.equal(student["kept"].sum(1), torch.full((4,), expected.shape[1]))
    # the teacher's tokens are its ViT on exactly those patches
    with torch.no_grad():
        ref = model.visual_encoder_m(batch["image"], patches=expected).tokens
    assert torch.allclose(seen["tokens"], ref, atol=1e-6)


def test_teacher_reduction_none_runs_unpruned_and_bad_values_named():
    cfg = load_config("tiny_albef_elip", ["model.vision.reduction.method=flip"])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    seen = {}
    model.visual_encoder_m.register_forward_hook(lambda m, a, o: seen.update(n=o.tokens.shape[1]))
    model(synthetic_batch(2))
    assert seen["n"] == 1 + model.visual_encoder.num_patches
    with pytest.raises(ValueError, match="model.teacher_reduction='half'"):
        build_model(load_config("tiny_albef_elip", ["model.teacher_reduction=half"]).model)
    with pytest.raises(ValueError, match="method=tome"):
        build_model(load_config("tiny_albef_elip", ["model.vision.reduction.method=tome",
                                                    "model.teacher_reduction=same"]).model)
