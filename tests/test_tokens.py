"""The pure token-reduction functions against their equations."""
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.tokens import elip, evit, tome
from pipeline.tokens.plan import ReductionConfig, build_plan
from pipeline.tokens.reducers import IDENTITY, ElipSelect, EvitFuse, TomeMerge


def _tokens(B=2, N=9, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g), torch.rand(B, N - 1, generator=g)


# -- ELIP ---------------------------------------------------------------------------------------
def test_fuse_cls_is_eq1_and_vision_only_fallback():
    img, txt = torch.randn(3, 8), torch.randn(3, 8)
    assert torch.allclose(elip.fuse_cls(img, txt, 0.8), 0.8 * img + 0.2 * txt)
    assert elip.fuse_cls(img, None, 0.8) is img
    with pytest.raises(ValueError, match="text_cls shape"):
        elip.fuse_cls(img, torch.randn(3, 5))


def test_elip_keep_all_is_identity():
    x, s = _tokens()
    assert elip.select_and_fuse(x, s, keep=x.shape[1] - 1) is x
    assert elip.select_and_fuse(x, s, keep=100) is x


def test_elip_keeps_top_scores_in_original_order_and_cls_first():
    x, _ = _tokens(B=1, N=7, D=3)
    s = torch.tensor([[0.1, 0.9, 0.05, 0.7, 0.3, 0.2]])
    out = elip.select_and_fuse(x, s, keep=3)
    assert out.shape == (1, 5, 3)
    assert torch.equal(out[:, 0], x[:, 0])
    # top-3 scores are tokens 1, 3, 4 of the non-CLS set -> x indices 2, 4, 5, in this order
    assert torch.equal(out[0, 1:4], x[0, [2, 4, 5]])
    dropped = torch.tensor([0.1, 0.05, 0.2])
    w = dropped / (dropped.sum() + 1e-6)
    assert torch.allclose(out[0, 4], (w[:, None] * x[0, [1, 3, 6]]).sum(0), atol=1e-6)


def test_elip_fused_weights_sum_to_one():
    # Fusing tokens that are all the same vector v gives back v iff the weights sum to 1.
    B, N, D = 2, 11, 5
    v = torch.randn(B, 1, D)
    x = torch.cat([torch.randn(B, 1, D), v.expand(B, N - 1, D)], dim=1)
    s = torch.rand(B, N - 1) + 0.1
    out = elip.select_and_fuse(x, s, keep=4)
    assert torch.allclose(out[:, -1], v[:, 0], atol=1e-5)


def test_elip_gradient_reaches_dropped_tokens_but_not_scores():
    x, s = _tokens(B=1, N=9, D=4)
    x.requires_grad_(True)
    s.requires_grad_(True)
    out = elip.select_and_fuse(x, s, keep=3)
    out[:, -1].sum().backward()  # only the fused token
    assert s.grad is None
    dropped = torch.ones(8, dtype=torch.bool)
    dropped[s[0].topk(3).indices] = False
    assert (x.grad[0, 1:][dropped].abs().sum(-1) > 0).all()
    assert (x.grad[0, 1:][~dropped] == 0).all()


def test_elip_rejects_wrong_score_shape():
    x, s = _tokens()
    with pytest.raises(ValueError, match="scores shape"):
        elip.select_and_fuse(x, s[:, 1:], keep=2)


# -- ToMe ---------------------------------------------------------------------------------------
def test_tome_r0_is_identity():
    x = torch.randn(2, 10, 4)
    merge, unmerge = tome.bipartite_soft_matching(x, 0)
    assert merge(x) is x and unmerge(x) is x
    y, size = tome.merge_wavg(merge, x)
    assert torch.equal(y, x) and torch.equal(size, torch.ones(2, 10, 1))


@pytest.mark.parametrize("r", [1, 3, 4, 50])
def test_tome_conserves_size_and_mass_and_protects_cls(r):
    torch.manual_seed(r)
    x = torch.randn(3, 10, 6, dtype=torch.float64)
    size = torch.randint(1, 4, (3, 10, 1)).double()
    merge, _ = tome.bipartite_soft_matching(x, r, class_token=True)
    y, new_size = tome.merge_wavg(merge, x, size)
    removed = min(r, (10 - 1) // 2)
    assert y.shape == (3, 10 - removed, 6)
    assert torch.allclose(new_size.sum(1), size.sum(1))
    assert torch.allclose((new_size * y).sum(1), (size * x).sum(1))
    assert torch.allclose(y[:, 0], x[:, 0]) and torch.equal(new_size[:, 0], size[:, 0])


def test_tome_merges_the_most_similar_pair_and_unmerge_restores_shape():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]]])
    merge, unmerge = tome.bipartite_soft_matching(x, 1, class_token=True)
    y = merge(x)
    # tokens 1 (B) and 2 (A) are identical: they merge, the others stay
    assert y.shape == (1, 4, 2)
    assert torch.equal(y[:, 0], x[:, 0])
    back = unmerge(y)
    assert back.shape == x.shape and torch.allclose(back, x)


def test_proportional_attention_equals_duplicated_keys():
    torch.manual_seed(0)
    B, H, N, d = 2, 3, 5, 4
    q, k, v = torch.randn(B, H, N, d), torch.randn(B, H, N, d), torch.randn(B, H, N, d)
    size = torch.tensor([[1, 2, 1, 3, 1], [2, 1, 1, 1, 4]]).float().unsqueeze(-1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=tome.proportional_attention_bias(size))
    for b in range(B):
        reps = size[b, :, 0].long()
        kd, vd = k[b].repeat_interleave(reps, dim=1), v[b].repeat_interleave(reps, dim=1)
        ref = F.scaled_dot_product_attention(q[b], kd, vd)
        assert torch.allclose(out[b], ref, atol=1e-5)


def test_r_schedules():
    assert tome.r_schedule(4, 5) == [5, 5, 5, 5]
    dec = tome.r_schedule(12, 10, inflect=-0.5)
    assert dec[0] > dec[-1] and all(a >= b for a, b in zip(dec, dec[1:]))
    assert abs(sum(dec) - 120) <= 12
    assert tome.r_schedule(4, [3, 2]) == [3, 2, 0, 0]
    with pytest.raises(ValueError, match="r schedule"):
        tome.r_schedule(2, [1, 2, 3])


# -- EViT ---------------------------------------------------------------------------------------
def test_evit_keeps_ceil_and_fused_weights_sum_to_leftover_mass():
    B, N, D = 2, 11, 3
    v = torch.randn(B, 1, D)
    x = torch.cat([torch.randn(B, 1, D), v.expand(B, N - 1, D)], dim=1)
    attn = torch.rand(B, N - 1).softmax(-1) * 0.9  # [CLS] keeps 0.1 on itself
    out = evit.select_and_fuse(x, attn, keep_rate=0.7)
    keep = math.ceil(0.7 * (N - 1))
    assert out.shape == (B, keep + 2, D)
    leftover = attn.sort(dim=1, descending=True).values[:, keep:].sum(1, keepdim=True)
    # all tokens equal v, so the fused token is v times the sum of its weights
    assert torch.allclose(out[:, -1], leftover * v[:, 0], atol=1e-6)
    assert torch.equal(out[:, 0], x[:, 0])


def test_evit_keep_rate_one_is_identity_and_bad_rate_rejected():
    x, s = _tokens()
    assert evit.select_and_fuse(x, s, 1.0) is x
    with pytest.raises(ValueError, match="keep_rate"):
        evit.select_and_fuse(x, s, 0.0)


# -- plan ---------------------------------------------------------------------------------------
def test_elip_default_plan_token_counts():
    plan224 = build_plan(ReductionConfig(method="elip"), 12, 196)
    assert plan224.tokens_per_layer(196) == [197, 197, 178, 178] + [129] * 6 + [80, 80]
    plan256 = build_plan(ReductionConfig(method="elip"), 12, 256)
    assert plan256.tokens_per_layer(256) == [257, 257, 232, 232] + [168] * 6 + [104, 104]
    # BLIP at 224 keeps [176, 127, 78] patches
    assert [k for k in plan224.elip_keep if k is not None] == [176, 127, 78]


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(method="elip", ratios=[0.9, 1.3, 0.4]), r"ratios\[1\]=1.3"),
        (dict(method="elip", ratios=[0.9, 0.0, 0.4]), r"ratios\[1\]=0.0"),
        (dict(method="elip", layers=[2, 4, 12]), r"layers\[2\]=12 out of range"),
        (dict(method="elip", layers=[0, 4, 10]), r"layers\[0\]=0 out of range"),
        (dict(method="elip", layers=[2, 2, 10]), "strictly increasing"),
        (dict(method="elip", layers=[2, 4]), "one ratio per layer"),
        (dict(method="evit", keep_rate=1.5), "keep_rate=1.5"),
        (dict(method="pruning"), "method='pruning'"),
        (dict(method="elip", elip_mode="fast"), "elip_mode='fast'"),
    ],
)
def test_invalid_plans_name_the_value(cfg, message):
    with pytest.raises(ValueError, match=message):
        build_plan(ReductionConfig(**cfg), 12, 196)


def test_default_layout_needs_12_layers():
    with pytest.raises(ValueError, match="4-layer"):
        build_plan(ReductionConfig(method="elip"), 4, 16)
    plan = build_plan(ReductionConfig(method="elip", layers=[1, 2], ratios=[0.5, 0.25]), 4, 16)
    assert plan.tokens_per_layer(16) == [17, 10, 6, 6]


def test_plan_steps_are_objects_and_identity_where_nothing_happens():
    off = build_plan(ReductionConfig(method="none"), 12, 196)
    assert off.before == off.inside == (IDENTITY,) * 12 and not off.text_guided
    x, scores = _tokens(N=197)
    out = IDENTITY(x, scores=scores)
    assert out.x is x and out.size is None and out.kept is None
    elip_plan = build_plan(ReductionConfig(method="elip"), 12, 196)
    assert elip_plan.text_guided and elip_plan.inside == (IDENTITY,) * 12
    assert [type(s) for s in elip_plan.before if s is not IDENTITY] == [ElipSelect] * 3
    evit_plan = build_plan(ReductionConfig(method="evit"), 12, 196)
    assert not evit_plan.text_guided and [i for i, s in enumerate(evit_plan.inside) if isinstance(s, EvitFuse)] == [3, 6, 9]
    tome_plan = build_plan(ReductionConfig(method="tome", r=8), 12, 196)
    assert all(isinstance(s, TomeMerge) and s.merges for s in tome_plan.inside)
    # each step's own count is what it does to a sequence
    for step in (ElipSelect(100), EvitFuse(0.7), TomeMerge(8)):
        keys = torch.randn(2, 2, 197, 4)
        assert step(x, scores=scores, keys=keys).x.shape[1] == step.tokens_after(197) < 197
    assert ElipSelect(195).tokens_after(197) == 197 and ElipSelect(195).acts(197)  # fuses 1 token, keeps the count
