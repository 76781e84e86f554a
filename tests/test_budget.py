"""The adaptive per-image budget: mass threshold per image, bounds, the batch's largest count."""
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


def test_the_batch_keeps_its_largest_count_and_each_image_its_own_top_tokens():
    torch.manual_seed(0)
    x, scores = torch.randn(6, 21, 8), _scores()
    step = ElipBudget(keep=15, tau=0.6, min_keep=2)
    r = step(x, scores=scores)
    k = int(r.counts.max())
    assert r.x.shape == (6, k + 2, 8)
    assert torch.equal(r.x, elip.select_and_fuse(x, scores, k))  # ELIP at the batch's count
    for b, own in enumerate(r.counts.tolist()):
        top = set(scores[b].topk(own).indices.tolist())
        assert top <= set(r.kept[b].tolist())


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
