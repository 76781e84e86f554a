"""Weights files load with a full key account: exactly, or refused naming the file and keys.

Tiny models are saved locally in each published layout (a timm ViT state dict, transformers
``ViTModel`` / ``CLIPVisionModel`` snapshots, BERT directories) and loaded through the config
keys a user sets (``model.vision.checkpoint``, ``model.text.pretrained``).
"""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForPreTraining, BertModel

from pipeline.models.text import BertTextFusion, TextConfig
from pipeline.models.vit import VisionEncoder, VitConfig
from pipeline.models.weights import CheckpointError, WeightsMismatchError, check_key_account

DIMS = dict(embed_dim=64, num_heads=2, patch_size=16, depth=2)
BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _vit_cfg(checkpoint, model_name="vit_base_patch16_224") -> VitConfig:
    return VitConfig(model_name=model_name, image_size=64, checkpoint=str(checkpoint), timm_kwargs=dict(DIMS))


def test_timm_state_dict_loads_exactly(tmp_path):
    torch.manual_seed(0)
    timm_vit = timm.create_model("vit_base_patch16_224", img_size=64, num_classes=10, **DIMS).eval()
    save_file(timm_vit.state_dict(), str(tmp_path / "model.safetensors"))  # with its classifier head
    vit = VisionEncoder(_vit_cfg(tmp_path)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(vit(images).tokens, timm_vit.forward_features(images), atol=1e-6)


def test_timm_state_dict_with_a_renamed_key_is_refused(tmp_path):
    state = timm.create_model("vit_base_patch16_224", img_size=64, num_classes=0, **DIMS).state_dict()
    state["blocks.1.attn.qkv.w"] = state.pop("blocks.1.attn.qkv.weight")
    file = tmp_path / "renamed.safetensors"
    save_file(state, str(file))
    with pytest.raises(WeightsMismatchError) as err:
        VisionEncoder(_vit_cfg(file))
    msg = str(err.value)
    assert str(file) in msg and "blocks.1.attn.qkv.weight" in msg and "blocks.1.attn.qkv.w'" in msg


def test_timm_state_dict_with_a_missing_key_is_refused(tmp_path):
    state = timm.create_model("vit_base_patch16_224", img_size=64, num_classes=0, **DIMS).state_dict()
    del state["norm.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsMismatchError, match=r"1 model weights get no value: \['norm.weight'\]"):
        VisionEncoder(_vit_cfg(tmp_path))


@pytest.mark.parametrize("name, content", [
    ("model.safetensors", b"\xff" * 64),  # a header length no safetensors file has
    ("model.pth", b"PK\x03\x04 cut short"),  # a torch zip cut at its first bytes
])
def test_a_damaged_vision_weights_file_is_one_error_naming_it(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"weights file {tmp_path / name} \(vision.checkpoint\) cannot be read"):
        VisionEncoder(_vit_cfg(tmp_path))


def test_transformers_vit_model_directory_is_refused(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                       image_size=64, patch_size=16)).save_pretrained(tmp_path)
    with pytest.raises(WeightsMismatchError) as err:
        VisionEncoder(_vit_cfg(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / "model.safetensors") in msg and "cls_token" in msg and "embeddings.cls_token" in msg
    assert "model_type='vit'" in msg and "transformers-format" in msg


def test_transformers_clip_vision_model_directory_is_refused(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=256, image_size=64, patch_size=16)).save_pretrained(tmp_path)
    with pytest.raises(WeightsMismatchError) as err:
        VisionEncoder(_vit_cfg(tmp_path, "vit_base_patch32_clip_224"))
    msg = str(err.value)
    assert str(tmp_path / "model.safetensors") in msg and "embeddings.class_embedding" in msg
    assert "model_type='clip_vision_model'" in msg


def _bert_dir(tmp_path, cls=BertForPreTraining):
    torch.manual_seed(0)
    model = cls(BertConfig(**BERT))
    model.save_pretrained(tmp_path)
    return model


def test_bert_directory_loads_exactly_into_the_text_encoder(tmp_path):
    bert = _bert_dir(tmp_path).eval()
    text = BertTextFusion(TextConfig(pretrained=str(tmp_path), text_layers=2), 30522, text_only=True).eval()
    ids = torch.randint(1000, 2000, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(text.encode_text(ids, mask), bert.bert(ids, attention_mask=mask).last_hidden_state,
                              atol=1e-5)
    fusion = BertTextFusion(TextConfig(pretrained=str(tmp_path), text_layers=1), 30522)  # 1 text + 1 fusion layer
    assert torch.equal(fusion.cls.predictions.transform.dense.weight, bert.cls.predictions.transform.dense.weight)
    assert torch.equal(fusion.encoder.layer[1].output.dense.weight, bert.bert.encoder.layer[1].output.dense.weight)


def test_bert_model_directory_without_mlm_head_loads(tmp_path):
    bert = _bert_dir(tmp_path, BertModel)
    text = BertTextFusion(TextConfig(pretrained=str(tmp_path), text_layers=2), 30522, text_only=True)
    assert torch.equal(text.encoder.layer[1].attention.self.query.weight, bert.encoder.layer[1].attention.self.query.weight)


def test_bert_directory_with_a_renamed_key_is_refused(tmp_path):
    _bert_dir(tmp_path)
    file = tmp_path / "model.safetensors"
    state = load_file(str(file))
    key = next(k for k in state if k.endswith("encoder.layer.0.attention.self.query.weight"))
    state[key.replace("query", "q")] = state.pop(key)
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(WeightsMismatchError) as err:
        BertTextFusion(TextConfig(pretrained=str(tmp_path), text_layers=1), 30522)
    msg = str(err.value)
    assert f"text.pretrained={tmp_path}" in msg
    assert "encoder.layer.0.attention.self.query.weight" in msg and "self.q.weight" in msg


def test_meter_text_encoder_refuses_a_renamed_key(tmp_path):
    from pipeline.models.meter import _text_model

    _bert_dir(tmp_path, BertModel)
    cfg = TextConfig(pretrained=str(tmp_path), text_layers=2)
    assert _text_model(cfg, 30522).config.num_hidden_layers == 2  # as saved: loads
    file = tmp_path / "model.safetensors"
    state = load_file(str(file))
    state["embeddings.LayerNorm.w"] = state.pop("embeddings.LayerNorm.weight")
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(WeightsMismatchError, match=r"embeddings\.LayerNorm\.weight"):
        _text_model(cfg, 30522)


def test_key_account_allows_only_the_declared_differences():
    check_key_account("f", ["head.weight"], ["blocks.3.x"], may_miss=["head.*"], may_leave=["blocks.3.*"])
    with pytest.raises(WeightsMismatchError, match=r"^f: .*get no value: \['norm.weight'\]"):
        check_key_account("f", ["head.weight", "norm.weight"], [], may_miss=["head.*"])


def test_evlgen_connectors_refuse_a_bert_directory_with_a_renamed_key(tmp_path):
    from pipeline.models.connectors import QFormerConfig, QFormerConnector, TomeFormer, TomeFormerConfig

    _bert_dir(tmp_path, BertModel)
    file = tmp_path / "model.safetensors"
    state = load_file(str(file))
    state["encoder.layer.1.output.dense.w"] = state.pop("encoder.layer.1.output.dense.weight")
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(WeightsMismatchError, match=rf"model.tomeformer.pretrained={tmp_path}: .*"
                                                   r"encoder\.layer\.1\.output\.dense\.weight"):
        TomeFormer(TomeFormerConfig(pretrained=str(tmp_path)), vision_width=48)
    with pytest.raises(WeightsMismatchError, match=rf"model.qformer.pretrained={tmp_path}: "):
        QFormerConnector(QFormerConfig(pretrained=str(tmp_path), num_queries=4), vision_width=48)


def test_an_llm_directory_with_a_renamed_key_is_refused(tmp_path):
    import shutil

    from tests.helpers_evlgen import tiny_llm
    from pipeline.models.evlgen import LLMConfig, load_llm

    llm_dir = tmp_path / "opt"
    shutil.copytree(tiny_llm(tmp_path / "llms", "opt"), llm_dir)
    llm, _ = load_llm(LLMConfig(pretrained=str(llm_dir)))  # as built: loads
    file = llm_dir / "model.safetensors"
    state = load_file(str(file))
    key = next(k for k in state if k.endswith("layers.1.fc1.weight"))
    state[key.replace("fc1", "fc_1")] = state.pop(key)
    save_file(state, str(file), metadata={"format": "pt"})
    with pytest.raises(WeightsMismatchError, match=rf"model.llm.pretrained={llm_dir}: .*layers\.1\.fc1\.weight"):
        load_llm(LLMConfig(pretrained=str(llm_dir)))


def test_train_cli_stops_on_a_damaged_vision_file_with_one_line(tmp_path, capsys):
    """The trainer's exit for a weights file that cannot be used: one line naming it, exit 1."""
    import json
    import subprocess
    import sys

    from data_prep import synthetic
    from tests.helpers_train import repo_root, subprocess_env

    synthetic.build(tmp_path / "train", num=8, image_size=64, shard_size=8, min_shards=1)
    (tmp_path / "vit.safetensors").write_bytes(b"\xff" * 64)
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", "tiny_clip", f"train.run_dir={run}",
                        f"data.train_shards={tmp_path / 'train'}", f"model.vision.checkpoint={tmp_path / 'vit.safetensors'}"],
                       cwd=repo_root(), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: weights file {tmp_path / 'vit.safetensors'} ")
    assert "Traceback" not in r.stderr
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == r.stderr.strip().splitlines()[-1][len("error: "):]
