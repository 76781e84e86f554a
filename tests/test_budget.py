"""The adaptive per-image budget: mass threshold per image, bounds, padding plus key masking."""
import pytest
import torch

from pipeline.tokens import budget, elip
from pipeline.tokens.plan import ReductionConfig, build_plan
from pipeline.tokens.reducers import ElipBudget
from tests.test_vit import tiny_encoder


def _scores(B=6, P=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    # peaked rows and flat rows: different images need different counts
    logits = torch.randn(B, P, generator=g) * torch.linspace(0.2, 4.0, B).unsqueeze(1)
    return logits.softmax(dim=1) * 0.9  # [CLS] keeps 10 % of the mass for itself


@pytest.mark.parametrize("tau", [0.3, 0.6, 0.9, 1.0])
def test_each_image_keeps_the_fewest_tokens_reaching_the_mass(tau):
    scores = _scores()
    counts = budget.mass_counts(scores, tau, 0, scores.shape[1])
    share = scores / scores.sum(1, keepdim=True)
    cum = share.sort(dim=1, descending=True).values.cumsum(1)
    for b, k in enumerate(counts.tolist()):
        assert cum[b, k - 1] >= tau - 1e-6  # enough mass
        if k > 1:
            assert cum[b, k - 2] < tau - 1e-6  # and one fewer is not
    assert len(set(counts.tolist())) > 1  # the images differ


def test_bounds_clamp_the_counts():
    scores = _scores()
    free = budget.mass_counts(scores, 0.6, 0, 20)
    bounded = budget.mass_counts(scores, 0.6, 4, 8)
    assert torch.equal(bounded, free.clamp(4, 8))
    assert bool((free < 4).any()) and bool((free > 8).any())  # both bounds bite on this batch


def test_each_image_keeps_its_own_count_and_fused_token_padded_to_the_largest():
    torch.manual_seed(0)
    x, scores = torch.randn(6, 21, 8), _scores()
    r = ElipBudget(keep=15, tau=0.6, min_keep=2)(x, scores=scores)
    k = int(r.counts.max())
    assert len(set(r.counts.tolist())) > 1  # padding is exercised
    assert r.x.shape == (6, k + 2, 8) and r.valid.shape == (6, k + 2)
    for b, own in enumerate(r.counts.tolist()):
        alone, kept = elip.select_and_fuse(x[b:b + 1], scores[b:b + 1], own, return_index=True)
        assert int(r.valid[b].sum()) == own + 2  # [CLS], its own tokens, its own fused token
        torch.testing.assert_close(r.x[b, :own + 2], alone[0], rtol=0, atol=1e-6)
        assert not r.x[b, own + 2:].any()  # padding: zero rows
        assert r.kept[b, :own].tolist() == kept[0].tolist() and bool((r.kept[b, own:] == -1).all())


def test_a_padded_input_selects_among_its_real_tokens_only():
    torch.manual_seed(0)
    x, scores = torch.randn(4, 13, 8), torch.rand(4, 12)
    valid = torch.arange(13)[None] < torch.tensor([13, 9, 6, 11])[:, None]
    x, scores = x * valid[..., None], scores * valid[:, 1:]
    r = ElipBudget(keep=10, tau=1.0, min_keep=0)(x, scores=scores, valid=valid)
    real = valid[:, 1:].sum(1)
    assert torch.equal(r.counts, torch.minimum(real, torch.tensor(10)))  # tau 1: every real token, to the bound
    for b in range(4):
        n = int(real[b])
        alone = elip.select_and_fuse(x[b:b + 1, :n + 1], scores[b:b + 1, :n], int(r.counts[b]))
        torch.testing.assert_close(r.x[b, :alone.shape[1]], alone[0], rtol=0, atol=1e-6)
        assert int(r.valid[b].sum()) == alone.shape[1]


def _peaked_encoder(cfg):
    """A tiny encoder (64 patches) whose [CLS] attention is peaked enough that images need
    different budgets at both stages."""
    enc = tiny_encoder(cfg, timm_kwargs={"depth": 4, "embed_dim": 64, "num_heads": 2, "patch_size": 8}).train()
    with torch.no_grad():
        for blk in enc.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    return enc


@pytest.mark.parametrize("mode", ["reuse", "lookahead"])
def test_masked_batched_forward_equals_each_image_alone_unpadded(mode):
    cfg = ReductionConfig(method="elip", elip_mode=mode, layers=[1, 3], ratios=[0.75, 0.4], budget_tau=0.7,
                          budget_min_ratio=0.05)
    enc = _peaked_encoder(cfg)
    torch.manual_seed(1)
    images, text_cls = torch.randn(6, 3, 64, 64), torch.randn(6, 64)
    with torch.no_grad():
        out = enc(images, text_cls=text_cls, track_patches=True)
        assert len(set(out.budgets[:, 0].tolist())) > 1 and len(set(out.budgets[:, 1].tolist())) > 1
        for b in range(6):
            alone = enc(images[b:b + 1], text_cls=text_cls[b:b + 1], track_patches=True)
            n = alone.tokens.shape[1]
            assert torch.equal(out.budgets[b], alone.budgets[0])
            torch.testing.assert_close(out.tokens[b, :n], alone.tokens[0], rtol=0, atol=1e-6)
            assert not out.tokens[b, n:].any()  # padding leaves as zero rows
            assert torch.equal(out.kept_patches[b], alone.kept_patches[0])
    real = budget.real_tokens(out.tokens)
    assert real is not None and out.mean_tokens_per_layer[-1] == pytest.approx(float(real.sum(1).float().mean()))
    assert out.mean_tokens_per_layer[-1] < out.tokens_per_layer[-1]  # fewer real tokens than computed


def test_gradients_reach_each_images_real_tokens_only_through_its_own_budget():
    cfg = ReductionConfig(method="elip", layers=[1, 3], ratios=[0.75, 0.4], budget_tau=0.7, budget_min_ratio=0.05)
    enc = _peaked_encoder(cfg)
    torch.manual_seed(1)
    images = torch.randn(4, 3, 64, 64, requires_grad=True)
    out = enc(images, text_cls=torch.randn(4, 64))
    out.tokens[0].sum().backward()  # image 0's tokens depend on image 0 alone
    assert images.grad[0].abs().sum() > 0 and not images.grad[1:].any()


def test_fusion_layers_mask_the_padding_rows():
    from tests.test_albef import tiny_albef
    from pipeline.models import build_model

    model = build_model(tiny_albef("none")).eval()
    torch.manual_seed(0)
    image = torch.randn(3, 9, 64)
    text, mask = torch.randn(3, 7, 64), torch.ones(3, 7, dtype=torch.long)
    padded = torch.cat([image, torch.zeros(3, 5, 64)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model.itm_scores(padded, text, mask), model.itm_scores(image, text, mask),
                                   rtol=0, atol=1e-5)
    assert budget.real_tokens(image) is None and budget.real_tokens(padded)[:, 9:].sum() == 0


def test_encoder_reports_per_image_budgets_within_the_layout_bounds():
    cfg = ReductionConfig(method="elip", layers=[1, 3], ratios=[0.75, 0.4], budget_tau=0.5, budget_min_ratio=0.1)
    enc = tiny_encoder(cfg).train()
    out = enc(torch.randn(4, 3, 64, 64), text_cls=torch.randn(4, 64))
    assert out.budgets.shape == (4, 2)
    assert bool((out.budgets[:, 0] <= 12).all() and (out.budgets[:, 1] <= 6).all() and (out.budgets >= 1).all())
    assert out.tokens_per_layer[1] == int(out.budgets[:, 0].max()) + 2
    assert out.tokens_per_layer[1] <= enc.expected_tokens_per_layer()[1]  # the plan's figure is the bound
    fixed = tiny_encoder(ReductionConfig(method="elip", layers=[1, 3], ratios=[0.75, 0.4]))
    assert fixed(torch.randn(1, 3, 64, 64), text_cls=torch.randn(1, 64)).budgets is None


def test_budget_keys_are_checked():
    with pytest.raises(ValueError, match="reduction.budget_tau=1.5"):
        build_plan(ReductionConfig(method="elip", budget_tau=1.5), 12, 196)
    with pytest.raises(ValueError, match="reduction.budget_min_ratio=0.5"):
        build_plan(ReductionConfig(method="elip", budget_tau=0.9, budget_min_ratio=0.5), 12, 196)
