"""METER with ELIP: co-attention fusion, ITM + MLM, ELIP guided by the pre-projection text [CLS],
ITM-only retrieval over every pair, a local RoBERTa text encoder."""
import pytest
import torch

from data_prep import synthetic
from pipeline.config import load_config
from pipeline.eval.retrieval import UNRANKED, evaluate_shards
from pipeline.models import build_model
from pipeline.models.meter import itm_pairs
from tests.helpers_backbones import synthetic_batch


@pytest.fixture(scope="module")
def meter():
    torch.manual_seed(0)
    return build_model(load_config("tiny_meter_elip").model)


def test_forward_returns_finite_losses_and_elip_token_counts(meter):
    meter.train()
    out = meter(synthetic_batch(4))
    for key in ("loss", "loss_itm", "loss_mlm"):
        assert torch.isfinite(out[key]), key
    assert torch.allclose(out["loss"].detach(), out["loss_itm"] + out["loss_mlm"])
    # 64 patches: ELIP keeps int(0.9*64)=57, int(0.7*64)=44, int(0.45*64)=28 (+ [CLS] + fused token)
    assert out["tokens_per_layer"] == [65, 59, 46, 30] == meter.visual_encoder.expected_tokens_per_layer()
    meter.zero_grad(set_to_none=True)
    out["loss"].backward()
    for module in (meter.visual_encoder.patch_embed, meter.text_transformer.embeddings, meter.cross_modal_image_layers,
                   meter.cross_modal_text_layers, meter.itm_score, meter.mlm_score):
        assert any(p.grad is not None for p in module.parameters()), module


def test_elip_is_guided_by_the_text_cls_before_the_cross_modal_projection(meter, monkeypatch):
    meter.eval()
    seen = {}
    original = meter.visual_encoder.forward

    def spy(images, text_cls=None, track_patches=False):
        seen["text_cls"] = text_cls
        return original(images, text_cls=text_cls, track_patches=track_patches)

    monkeypatch.setattr(meter.visual_encoder, "forward", spy)
    tok = meter.tokenize(["two red circles at the top left"] * 2, torch.device("cpu"))
    meter.infer(tok.input_ids, tok.attention_mask, torch.randn(2, 3, 64, 64))
    text = meter.encode_text(tok.input_ids, tok.attention_mask)
    assert torch.equal(seen["text_cls"], text.hidden[:, 0])


def test_itm_pairs_half_positive_and_negatives_are_other_images():
    for seed in range(10):
        labels, pick = itm_pairs(6, torch.Generator().manual_seed(seed))
        assert labels.sum() == 3
        same = pick == torch.arange(6)
        assert torch.equal(same, labels.bool())  # positives keep their image, negatives never do


def test_image_stream_self_attention_is_not_causal():
    """A later image token must influence the first one (the fusion layers are transformers'
    decoder-config BertLayers: without an explicit mask their self-attention would be causal).
    One fusion layer, so that the image stream sees the others only through its self-attention."""
    torch.manual_seed(0)
    meter = build_model(load_config("tiny_meter_elip", ["model.fusion_layers=1"]).model).eval()
    text = torch.randn(1, 5, 64)
    image = torch.randn(1, 9, 64)
    changed = image.clone()
    changed[0, -1] += 1.0
    _, y1, _ = meter.fuse(text, torch.ones(1, 5, dtype=torch.long), image)
    _, y2, _ = meter.fuse(text, torch.ones(1, 5, dtype=torch.long), changed)
    assert not torch.allclose(y1[0, 0], y2[0, 0])


def test_retrieval_scores_every_pair_by_itm(meter, tmp_path):
    meter.eval()
    synthetic.build(tmp_path / "eval", num=6, split="test", captions_per_image=2, image_size=64, shard_size=6,
                    min_shards=1)
    calls = []
    original = meter.itm_scores

    def count(image_embeds, text_embeds, mask):
        calls.append(len(image_embeds))
        return original(image_embeds, text_embeds, mask)

    meter.itm_scores = count
    try:
        m = evaluate_shards(meter, str(tmp_path / "eval"), image_size=64, batch_size=4, k_test=2)
    finally:
        del meter.itm_scores
    assert m["num_images"] == 6 and m["num_texts"] == 12
    assert "itc_txt_r1" not in m  # no ITC to report
    # k_test=2 is ignored: each image row scores all 12 captions, once (text retrieval reuses them)
    assert calls == [12] * 6
    assert m["txt_r10"] >= m["txt_r5"] >= m["txt_r1"] and m["img_r10"] == 100.0  # 6 images: all within 10


def test_rerank_without_itc_leaves_no_pair_unranked(meter):
    import pipeline.eval.retrieval as retrieval

    meter.eval()
    images, _ = meter.image_features(torch.randn(3, 3, 64, 64))
    texts, mask, _ = meter.text_features(["a red square", "two blue circles", "a green triangle", "one"], "cpu")
    sims = torch.zeros(3, 4)
    scores = retrieval._rerank(meter, sims, images, texts, mask, True, 4, 0, 1)
    assert (scores != UNRANKED).all()
    assert torch.allclose(scores[1], meter.itm_scores(images[1:2].expand(4, -1, -1), texts, mask))


def test_local_roberta_text_encoder(tmp_path):
    """METER's RoBERTa option: a local directory with a BPE tokenizer and a RobertaModel."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    corpus = [synthetic.make_example(0, i)[1][0] for i in range(50)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=320, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(tmp_path))
    tok = RobertaTokenizer.from_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    config = RobertaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=128, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    source = RobertaModel(config, add_pooling_layer=False)
    source.save_pretrained(tmp_path)
    cfg = load_config("tiny_meter_elip", [f"model.text.pretrained={tmp_path}", "model.text.text_layers=2"]).model
    model = build_model(cfg)
    assert type(model.text_transformer).__name__ == "RobertaModel" and len(model.tokenizer) == len(tok) > 100
    assert torch.equal(model.text_transformer.encoder.layer[1].output.dense.weight,
                       source.encoder.layer[1].output.dense.weight)
    out = model(synthetic_batch(4))
    assert torch.isfinite(out["loss"]) and out["loss_mlm"] > 0


def test_config_errors_name_the_keys():
    with pytest.raises(ValueError, match="model.text.text_layers=3 must equal the text encoder depth 4"):
        build_model(load_config("tiny_meter_elip", ["model.text.text_layers=3"]).model)
    with pytest.raises(ValueError, match="model.fusion_layers=0"):
        build_model(load_config("tiny_meter_elip", ["model.fusion_layers=0"]).model)
    with pytest.raises(ValueError, match="needs at least 2 samples"):
        build_model(load_config("tiny_meter_elip").model)(synthetic_batch(1))


def test_clip_vit_weights_load_without_their_last_layer(tmp_path):
    """meter_elip.yaml keeps 11 of CLIP's 12 layers (timm_kwargs depth 11: the key account expects the
    dropped layer unused)."""
    import timm
    from safetensors.torch import save_file

    from pipeline.models.vit import VisionEncoder, VitConfig

    torch.manual_seed(0)
    dims = dict(embed_dim=64, num_heads=2, patch_size=16)
    clip = timm.create_model("vit_base_patch32_clip_224", depth=5, img_size=64, num_classes=0, **dims)
    save_file(clip.state_dict(), str(tmp_path / "model.safetensors"))
    vit = VisionEncoder(VitConfig(model_name="vit_base_patch32_clip_224", image_size=64, checkpoint=str(tmp_path),
                                  timm_kwargs=dict(depth=4, **dims)))
    assert len(vit.blocks) == 4
    assert torch.equal(vit.blocks[3].mlp.fc1.weight, clip.blocks[3].mlp.fc1.weight)
    assert torch.equal(vit.norm.weight, clip.norm.weight)  # CLIP's ln_post, applied after the kept layers
    assert torch.equal(vit.norm_pre.weight, clip.norm_pre.weight)  # ln_pre


def test_cross_modal_layers_and_heads_get_five_times_the_learning_rate():
    from pipeline.train.optim import build_optimizer, build_scheduler

    cfg = load_config("tiny_meter_elip", ["optim.max_steps=10"])
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg, offload=False)
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    for _ in range(3):  # through the warm-up: the schedule scales every group alike
        lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        base = lr[id(model.text_transformer.embeddings.word_embeddings.weight)]
        assert lr[id(model.visual_encoder.patch_embed.proj.weight)] == base
        assert lr[id(model.token_type_embeddings.weight)] == base  # not a cross_modal_* module in METER
        for p in (model.cross_modal_text_layers[0].attention.self.query.weight, model.cross_modal_image_pooler.dense.bias,
                  model.itm_score.weight, model.mlm_score.predictions.transform.dense.weight):
            assert lr[id(p)] == pytest.approx(5 * base)
        optimizer.step()
        scheduler.step()


def _image_share_of_pooled_text(model, width: int) -> float:
    """How much a change of image moves the fusion's pooled text [CLS], relative to how much it
    differs between captions (random unit-variance encoder outputs)."""
    g = torch.Generator().manual_seed(0)
    text, image, other = (torch.randn(8, n, width, generator=g) for n in (6, 9, 9))
    mask = torch.ones(8, 6, dtype=torch.long)
    with torch.no_grad():
        a = model.fuse(text, mask, image)[2][:, :width]
        b = model.fuse(text, mask, other)[2][:, :width]
    return ((a - b).std() / a.std(0).mean()).item()


def test_fresh_fusion_sees_the_image_at_tiny_width_as_meter_does_at_768(meter):
    """Regression (issue 12.6): METER's N(0, 0.02) init at width 64 left the pooled text [CLS]
    almost blind to the image (1.3%), so ITM (on the two pooled halves) sat at ln 2; the init
    scaled by sqrt(768 / width) gives the share METER-base has at init (about 19%)."""
    meter.eval()
    torch.manual_seed(0)
    base = build_model(load_config("tiny_meter_elip", [
        "model.text.bert={hidden_size: 768, num_hidden_layers: 1, num_attention_heads: 12, intermediate_size: 3072}",
        "model.text.text_layers=1", "model.vision.timm_kwargs={depth: 1, embed_dim: 768, num_heads: 12, patch_size: 16}",
        "model.vision.reduction.method=none"]).model).eval()  # the tiny one's 2 fusion layers
    assert base.cross_modal_text_transform.weight.std().item() == pytest.approx(0.02, rel=0.05)  # METER's own
    tiny, meter_base = _image_share_of_pooled_text(meter, 64), _image_share_of_pooled_text(base, 768)
    assert meter_base > 0.1 and tiny > 0.5 * meter_base, (tiny, meter_base)
