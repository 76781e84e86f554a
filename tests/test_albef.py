"""ALBEF with ELIP: losses, momentum teacher, queues, local BERT loading, retrieval API."""
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from pipeline.models import build_model
from pipeline.models.albef import AlbefConfig
from pipeline.models.losses import mask_tokens, sample_hard_negatives
from pipeline.models.text import TINY_TOKENIZER, BertTextFusion, TextConfig, load_tokenizer
from pipeline.models.vit import VitConfig
from pipeline.tokens.plan import ReductionConfig

TINY_BERT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128)
CAPTIONS = ["two red circles at the top left", "a blue square in the bottom right"] * 2


def tiny_albef(method="elip", **kw) -> AlbefConfig:
    reduction = {
        "none": ReductionConfig(),
        "elip": ReductionConfig(method="elip", layers=[1, 3], ratios=[0.75, 0.4]),
        "tome": ReductionConfig(method="tome", r=2),
        "evit": ReductionConfig(method="evit", layers=[1, 2], keep_rate=0.5),
    }[method]
    vision = VitConfig(image_size=64, timm_kwargs=dict(depth=4, embed_dim=64, num_heads=2), reduction=reduction)
    return AlbefConfig(vision=vision, text=TextConfig(bert=TINY_BERT, text_layers=2), embed_dim=32, queue_size=10, **kw)


@pytest.mark.parametrize("method", ["none", "elip", "tome", "evit"])
def test_forward_returns_finite_losses_and_token_counts(method):
    torch.manual_seed(0)
    model = build_model(tiny_albef(method))
    out = model({"image": torch.randn(4, 3, 64, 64), "text": CAPTIONS, "epoch_progress": 0.3})
    for key in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
        assert torch.isfinite(out[key]), key
    assert torch.allclose(out["loss"].detach(), out["loss_itc"] + out["loss_itm"] + out["loss_mlm"])
    assert out["tokens_per_layer"] == model.visual_encoder.expected_tokens_per_layer()
    out["loss"].backward()
    assert model.visual_encoder.patch_embed.proj.weight.grad is not None
    assert all(p.grad is None for p in model.visual_encoder_m.parameters())
    if method == "elip":
        assert out["tokens_per_layer"] == [17, 14, 14, 8]
        assert out["kept_patches"].shape == (4, 16)


def test_momentum_teacher_is_unpruned_and_follows_the_student():
    torch.manual_seed(0)
    model = build_model(tiny_albef("elip", momentum=0.5))
    assert model.visual_encoder_m.plan.method == "none"
    assert model.visual_encoder.plan.method == "elip"
    student = model.vision_proj.weight
    with torch.no_grad():
        student.add_(1.0)
    before = model.vision_proj_m.weight.clone()
    model._momentum_update()
    assert torch.allclose(model.vision_proj_m.weight, 0.5 * before + 0.5 * student)


def test_queue_is_a_ring_buffer():
    torch.manual_seed(0)
    model = build_model(tiny_albef("none"))  # queue of 10
    for step in range(3):  # 3 x 4 = 12 features: wraps around once
        feats = torch.full((4, 32), float(step + 1))
        model._enqueue(feats, feats)
    assert model.queue_ptr.item() == 2
    assert model.image_queue[0].tolist() == [3, 3, 1, 1, 2, 2, 2, 2, 3, 3]


def test_hard_negatives_are_never_the_positive():
    sims = torch.randn(6, 6) * 5
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        neg_img, neg_txt = sample_hard_negatives(sims, sims.T, generator=gen)
        assert (neg_img != torch.arange(6)).all() and (neg_txt != torch.arange(6)).all()


def test_hard_negatives_need_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1))


def test_mlm_masking_spares_special_tokens():
    tok = load_tokenizer(TextConfig())
    ids = tok(["two red circles at the top left and a blue square"] * 64, return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(ids, len(tok), tok.mask_token_id, [tok.cls_token_id, tok.sep_token_id], 0.15, gen)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert 0.10 < chosen[:, 1:-1].float().mean() < 0.20
    assert (masked[chosen] == tok.mask_token_id).float().mean() > 0.7
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_text_encoder_loads_a_local_bert_directory(tmp_path):
    torch.manual_seed(0)
    tok = load_tokenizer(TextConfig())
    source = BertForMaskedLM(BertConfig(vocab_size=len(tok), **TINY_BERT))
    source.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    enc = BertTextFusion(TextConfig(pretrained=str(tmp_path), text_layers=2), vocab_size=len(tok))
    src = source.state_dict()
    assert torch.equal(enc.embeddings.word_embeddings.weight, src["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(enc.encoder.layer[3].output.dense.weight, src["bert.encoder.layer.3.output.dense.weight"])
    assert hasattr(enc.encoder.layer[2], "crossattention") and not hasattr(enc.encoder.layer[1], "crossattention")
    assert load_tokenizer(TextConfig(pretrained=str(tmp_path))).vocab == tok.vocab


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertTextFusion(TextConfig(pretrained=str(tmp_path)), vocab_size=10)
    with pytest.raises(ValueError, match="text_layers=9"):
        BertTextFusion(TextConfig(bert=TINY_BERT, text_layers=9), vocab_size=10)
    cfg = tiny_albef()
    cfg.text.bert = dict(TINY_BERT, hidden_size=32)
    with pytest.raises(ValueError, match="width 64 != model.text hidden_size 32"):
        build_model(cfg)
    assert TINY_TOKENIZER.endswith("tiny_tokenizer")


def test_retrieval_api_shapes_and_itm_scores():
    torch.manual_seed(0)
    model = build_model(tiny_albef("elip")).eval()
    image_embeds, image_feat = model.image_features(torch.randn(3, 3, 64, 64))
    text_embeds, mask, text_feat = model.text_features(CAPTIONS[:3], torch.device("cpu"))
    assert image_embeds.shape == (3, 8, 64) and image_feat.shape == (3, 32)
    assert torch.allclose(image_feat.norm(dim=-1), torch.ones(3)) and torch.allclose(text_feat.norm(dim=-1), torch.ones(3))
    assert model.itm_scores(image_embeds, text_embeds, mask).shape == (3,)
