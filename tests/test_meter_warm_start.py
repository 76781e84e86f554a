"""METER starts from CLIP's ViT and a pre-trained text encoder: ``train.init_from`` from the
demo's tiny CLIP warm start (trained with METER's ViT, as ``launch/demo.sh`` does) fills every
ViT and text-encoder weight through METER's ``init_from_renames``."""
METER_VIT = ["model.vision.model_name=vit_base_patch32_clip_224",
             "model.vision.timm_kwargs={depth: 4, embed_dim: 64, num_heads: 2, patch_size: 8}"]


def test_init_from_a_clip_fills_meters_vit_and_text_encoder(tmp_path, monkeypatch):
    """Unit level: every ViT and text-encoder weight of METER comes from the warm start (CLIP's
    ``text_encoder.*`` lands in ``text_transformer.*``); fusion and heads keep their init."""
    import torch

    from pipeline.config import load_config
    from pipeline.models import build_model, weights

    torch.manual_seed(0)
    clip_state = build_model(load_config("tiny_clip", ["model.text.text_layers=4", *METER_VIT]).model).state_dict()
    monkeypatch.setattr(weights, "find_checkpoint", lambda path: tmp_path)
    monkeypatch.setattr(weights, "consolidated_state_dict", lambda tag_dir: clip_state)
    torch.manual_seed(1)
    meter = build_model(load_config("tiny_meter_elip").model)
    _, copied, kept = weights.init_from(meter, tmp_path)
    assert not [k for k in kept if k.startswith(("visual_encoder.", "text_transformer."))], kept
    assert all(k.startswith(("cross_modal_", "token_type_embeddings.", "mlm_score.", "itm_score.")) for k in kept), kept
    state = meter.state_dict()
    assert torch.equal(state["visual_encoder.norm_pre.weight"], clip_state["visual_encoder.norm_pre.weight"])
    assert torch.equal(state["text_transformer.encoder.layer.3.output.dense.weight"],
                       clip_state["text_encoder.encoder.layer.3.output.dense.weight"])
