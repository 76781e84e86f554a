"""ALBEF's SNLI-VE head: forward/backward and loss on the tiny model, labels from KEY.json,
ELIP pruning during fine-tuning, init_from a pre-training run's encoders, and the classification
evaluation on synthetic SNLI-VE shards against its chance level."""
import pytest
import torch

from data_prep.__main__ import main as data_prep_main
from pipeline.config import load_config
from pipeline.eval.classify import evaluate_shards
from pipeline.eval.tasks import check_contract
from pipeline.models import build_model
from tests.helpers_train import fit_batch, save_checkpoint

TEXTS = ["there are two red circles", "the blue square is at the top left", "the red circle is made of paper"]


def _batch(n: int = 6) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(n, 3, 64, 64, generator=g), "text": [TEXTS[i % 3] for i in range(n)],
            "meta": [{"label_id": i % 3} for i in range(n)]}


def test_ve_head_forward_backward_prunes_and_fits_a_batch():
    torch.manual_seed(0)
    model = build_model(load_config("tiny_albef_ve").model).train()
    check_contract(model, "classify", "albef_ve")
    out = model(_batch())
    assert out["tokens_per_layer"] == [65, 50, 50, 27]  # ELIP keeps pruning while fine-tuning
    assert out["loss"].item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), abs=0.3)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.cls_head.parameters())
    assert model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert fit_batch(model, _batch(3), steps=15) < 0.5


def test_ve_labels_come_from_key_json_and_a_missing_one_is_named():
    torch.manual_seed(0)
    model = build_model(load_config("tiny_albef_ve").model)
    batch = _batch(2)
    batch["meta"] = [{"label_id": 0, "key": "a"}, {"label": "neutral", "key": "b"}]
    with pytest.raises(ValueError, match=r"samples \['b'\]: KEY.json has no integer 'label_id'"):
        model(batch)


def test_init_from_an_albef_pretraining_copies_the_encoders_not_the_head(tmp_path):
    from pipeline.models.weights import init_from

    torch.manual_seed(1)
    albef = build_model(load_config("tiny_albef_elip").model)
    save_checkpoint(tmp_path / "run", albef.state_dict())
    torch.manual_seed(0)
    ve = build_model(load_config("tiny_albef_ve").model)
    _, copied, kept = init_from(ve, tmp_path / "run")
    assert any(k.startswith("visual_encoder.") for k in copied) and any(k.startswith("text_encoder.") for k in copied)
    assert all(k.startswith("cls_head.") for k in kept) and kept
    assert torch.equal(ve.visual_encoder.patch_embed.proj.weight, albef.visual_encoder.patch_embed.proj.weight)


def test_classification_evaluation_on_synthetic_ve_shards(tmp_path):
    out = tmp_path / "ve"
    assert data_prep_main(["synthetic_ve", "--num", "30", "--eval", "--out", str(out), "--image-size", "64",
                           "--no-progress", "--workers", "1", "--min-shards", "1"]) == 0
    torch.manual_seed(0)
    model = build_model(load_config("tiny_albef_ve").model).eval()
    m = evaluate_shards(model, str(out), image_size=64, batch_size=8)
    assert m["num_samples"] == 30 and 100 / 3 <= m["chance"] <= 100 and 0 <= m["accuracy"] <= 100
    with torch.no_grad():  # a head that always says "neutral" scores exactly neutral's share
        model.cls_head[2].weight.zero_()
        model.cls_head[2].bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    neutral = evaluate_shards(model, str(out), image_size=64, batch_size=8)["accuracy"]
    import json
    import tarfile
    labels = [json.loads(tarfile.open(t).extractfile(m_).read())["label_id"]
              for t in sorted(out.glob("*.tar")) for m_ in tarfile.open(t).getmembers() if m_.name.endswith(".json")]
    assert neutral == pytest.approx(100 * labels.count(1) / len(labels))


def test_classify_cli_reloads_a_fine_tuned_checkpoint(tmp_path, capsys):
    import json

    from pipeline.config import save_config
    from pipeline.eval.__main__ import main as eval_main
    from tests.test_vqa_eval import _checkpoint

    out = tmp_path / "ve"
    assert data_prep_main(["synthetic_ve", "--num", "20", "--eval", "--out", str(out), "--image-size", "64",
                           "--no-progress", "--workers", "1", "--min-shards", "1"]) == 0
    run = tmp_path / "run"
    cfg = load_config("tiny_albef_ve", [f"train.run_dir={run}"])
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(3)
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # the checkpoint always says "contradiction": the CLI must score its weights
        model.cls_head[2].weight.zero_()
        model.cls_head[2].bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    _checkpoint(model, run, step=3)
    assert eval_main(["classify", "--run", str(run), "--shards", str(out)]) == 0
    result = json.loads((run / "eval.json").read_text())
    direct = evaluate_shards(model, str(out), image_size=64, batch_size=8)
    assert result["step"] == 3 and result["num_samples"] == 20
    assert result["accuracy"] == pytest.approx(direct["accuracy"]) and "chance" in capsys.readouterr().out
