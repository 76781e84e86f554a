"""One ViT encoder running every reduction plan."""
import pytest
import torch

from pipeline.models.vit import VisionEncoder, VitConfig, create_timm_vit
from pipeline.tokens import elip
from pipeline.tokens.plan import ReductionConfig

TINY = dict(depth=4, embed_dim=64, num_heads=2)
TINY_PLANS = {
    "none": ReductionConfig(method="none"),
    "elip-reuse": ReductionConfig(method="elip", elip_mode="reuse", layers=[1, 3], ratios=[0.75, 0.4]),
    "elip-lookahead": ReductionConfig(method="elip", elip_mode="lookahead", layers=[1, 3], ratios=[0.75, 0.4]),
    "tome": ReductionConfig(method="tome", r=3),
    "evit": ReductionConfig(method="evit", layers=[1, 2], keep_rate=0.6),
}


def tiny_encoder(reduction: ReductionConfig, **kw) -> VisionEncoder:
    torch.manual_seed(0)
    cfg = VitConfig(**{"model_name": "vit_base_patch16_224", "image_size": 64, "timm_kwargs": TINY,
                       "reduction": reduction, **kw})
    return VisionEncoder(cfg)


def test_none_plan_equals_timm_forward_on_the_same_weights():
    enc = tiny_encoder(TINY_PLANS["none"]).eval()
    timm_vit = create_timm_vit(enc.cfg).eval()
    timm_vit.load_state_dict(enc.state_dict())  # strict: the encoder keeps timm's parameter names
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = enc(images).tokens
        ref = timm_vit.forward_features(images)
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize(
    "size, expected",
    [
        (224, [197, 197, 178, 178] + [129] * 6 + [80, 80]),
        (256, [257, 257, 232, 232] + [168] * 6 + [104, 104]),
    ],
)
@pytest.mark.parametrize("mode", ["reuse", "lookahead"])
def test_vit_b16_sequence_lengths_with_default_elip_plan(size, expected, mode):
    enc = VisionEncoder(
        VitConfig(image_size=size, reduction=ReductionConfig(method="elip", elip_mode=mode))
    ).eval()
    with torch.no_grad():
        out = enc(torch.randn(1, 3, size, size), text_cls=torch.randn(1, 768))
    assert out.tokens_per_layer == expected
    assert out.tokens.shape == (1, expected[-1], 768)


@pytest.mark.parametrize("name", list(TINY_PLANS))
def test_every_plan_runs_with_gradient_checkpointing(name):
    images, text_cls = torch.randn(2, 3, 64, 64), torch.randn(2, 64)
    grads = []
    for ckpt in (False, True):
        enc = tiny_encoder(TINY_PLANS[name], grad_checkpointing=ckpt).train()
        out = enc(images, text_cls=text_cls)
        assert out.tokens_per_layer == enc.expected_tokens_per_layer()
        out.tokens.pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in enc.parameters() if p.grad is not None]))
    assert grads[0].shape == grads[1].shape
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_text_guides_elip_selection_and_none_falls_back_to_vision_only():
    images = torch.randn(2, 3, 64, 64)
    for mode in ("reuse", "lookahead"):
        enc = tiny_encoder(TINY_PLANS[f"elip-{mode}"]).eval()
        with torch.no_grad():
            vision_only = enc(images, track_patches=True)
            lam_one = tiny_encoder(
                ReductionConfig(method="elip", elip_mode=mode, layers=[1, 3], ratios=[0.75, 0.4], lam=1.0)
            ).eval()(images, text_cls=torch.randn(2, 64), track_patches=True)
            guided = [enc(images, text_cls=10 * torch.randn(2, 64), track_patches=True) for _ in range(4)]
        assert torch.equal(vision_only.kept_patches, lam_one.kept_patches)
        assert torch.allclose(vision_only.tokens, lam_one.tokens, atol=1e-6)
        assert any(not torch.equal(g.kept_patches, vision_only.kept_patches) for g in guided), mode


def test_reuse_scores_are_the_fused_cls_row_of_that_layers_attention():
    enc = tiny_encoder(TINY_PLANS["elip-reuse"]).eval()
    x = torch.randn(2, 17, 64)
    text_cls = torch.randn(2, 64)
    guide = elip.fuse_cls(x[:, 0], text_cls, 0.8)
    with torch.no_grad():
        _, _, _, scores = enc._block(0, x, None, None, guide, want_scores=True)
        blk = enc.blocks[0]
        # materialise the whole attention of the sequence with the fused [CLS] as token 0
        h = blk.norm1(torch.cat([guide[:, None], x[:, 1:]], 1))
        q = blk.attn.qkv(h)[..., :64].reshape(2, 17, 2, 32).transpose(1, 2)
        k = blk.norm1(x)
        k = blk.attn.qkv(k)[..., 64:128].reshape(2, 17, 2, 32).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1) * 32**-0.5).softmax(-1).mean(1)
    assert torch.allclose(scores, attn[:, 0, 1:], atol=1e-6)


def test_kept_patches_mark_the_surviving_original_patches():
    enc = tiny_encoder(TINY_PLANS["elip-reuse"]).eval()
    with torch.no_grad():
        out = enc(torch.randn(3, 3, 64, 64), track_patches=True)
    assert out.kept_patches.shape == (3, 16)
    # the last selection keeps int(0.4*16)=6 tokens; at most all 6 are original patches
    assert ((out.kept_patches.sum(1) >= 1) & (out.kept_patches.sum(1) <= 6)).all()
    assert tiny_encoder(TINY_PLANS["tome"]).eval()(torch.randn(1, 3, 64, 64), track_patches=True).kept_patches is None


@pytest.mark.parametrize("layout", ["file", "deit_file", "dir"])
def test_weights_load_from_local_file_or_directory(tmp_path, layout):
    src = tiny_encoder(TINY_PLANS["none"])
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state["head.weight"], state["head.bias"] = torch.randn(1000, 64), torch.randn(1000)  # a classifier checkpoint
    if layout == "file":
        path = tmp_path / "vit.pth"
        torch.save(state, path)
    elif layout == "deit_file":
        path = tmp_path / "deit.pth"
        torch.save({"model": state}, path)
    else:
        path = tmp_path / "vit_dir"
        path.mkdir()
        torch.save(state, path / "pytorch_model.bin")
    torch.manual_seed(123)  # a different random init that the load must overwrite
    enc = VisionEncoder(
        VitConfig(image_size=64, timm_kwargs=TINY, checkpoint=str(path), reduction=TINY_PLANS["none"])
    )
    loaded = enc.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(loaded[k], v), k


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VisionEncoder(VitConfig(image_size=64, timm_kwargs=TINY, checkpoint=str(tmp_path / "nope.pth")))
    with pytest.raises(FileNotFoundError, match="no weights file"):
        VisionEncoder(VitConfig(image_size=64, timm_kwargs=TINY, checkpoint=str(tmp_path)))
