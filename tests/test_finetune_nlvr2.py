"""NLVR2: pair samples in the loaders (shape, each image augmented on its own, a pair missing an
image skipped and counted, exact resume), ALBEF's NLVR2 head (forward/backward, loss, fitting a
batch, labels from KEY.json), init_from a pre-training run's encoders, and the classification
evaluation on synthetic NLVR2 shards against its class shares."""
import io
import json
import logging
import tarfile
from dataclasses import replace

import pytest
import torch

from data_prep.__main__ import main as data_prep_main
from pipeline.config import DataConfig, load_config
from pipeline.data.loader import TrainLoader, build_eval_loader
from pipeline.eval.classify import evaluate_shards
from pipeline.eval.tasks import check_contract
from pipeline.models import build_model
from tests.helpers_train import fit_batch, save_checkpoint

STATEMENTS = ["the left image has more circles than the right image", "both images contain a square",
              "exactly one image contains something red"]


def _members(tar) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(tar) as t:
        return [(m, t.extractfile(m).read()) for m in t.getmembers()]


def _labels(shards) -> list[bool]:
    return [json.loads(data)["label"] for tar in sorted(shards.glob("*.tar"))
            for m, data in _members(tar) if m.name.endswith(".json")]


@pytest.fixture(scope="module")
def nlvr2_shards(tmp_path_factory):
    """16 synthetic NLVR2 pairs in 2 shards, and a copy in which the first shard's first pair has
    lost its right image and its second pair shows the same picture left and right."""
    root = tmp_path_factory.mktemp("nlvr2")
    clean = root / "clean"
    assert data_prep_main(["synthetic_nlvr2", "--num", "16", "--eval", "--out", str(clean), "--image-size", "32",
                           "--shard-size", "8", "--no-progress", "--workers", "1", "--min-shards", "1"]) == 0
    broken = root / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_bytes((clean / "manifest.json").read_bytes())
    tars = sorted(clean.glob("*.tar"))
    keys = sorted({m.name.split(".")[0] for m, _ in _members(tars[0])})
    lost, twin = keys[0], keys[1]
    for tar in tars:
        members = _members(tar)
        left = {m.name: d for m, d in members}.get(f"{twin}.left.jpg")
        with tarfile.open(broken / tar.name, "w") as out:
            for m, data in members:
                if m.name == f"{lost}.right.jpg":
                    continue
                if m.name == f"{twin}.right.jpg":
                    data, m.size = left, len(left)
                out.addfile(m, io.BytesIO(data))
    return clean, broken, lost, twin


def test_loaders_read_pairs_augment_each_image_and_skip_a_pair_missing_one(nlvr2_shards, caplog):
    _, broken, lost, twin = nlvr2_shards
    cfg = replace(DataConfig(), train_shards=str(broken), image_size=32, batch_size=4, workers=0, shuffle_buffer=0,
                  crop_scale=(0.3, 1.0), randaugment=False, hflip=False)
    loader = TrainLoader(cfg)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        epoch = loader.iter_epoch(0)
        first = next(epoch)
        state = loader.position.state_dict()
        batches = [first, *epoch]
    assert len(batches) == 4 and all(b["image"].shape == (4, 2, 3, 32, 32) for b in batches)
    keys = [k for b in batches for k in b["key"]]
    assert lost not in keys and loader.position.errors == 1
    assert any(f"pair sample {lost!r} has no right image" in r.getMessage() for r in caplog.records)
    # one picture on both sides: two crops of their own, not one crop for the pair
    b, i = next((b, b["key"].index(twin)) for b in batches if twin in b["key"])
    assert not torch.allclose(b["image"][i, 0], b["image"][i, 1], atol=0.1)
    assert isinstance(b["meta"][i]["label"], bool) and b["text"][i]
    resumed = TrainLoader(cfg)
    resumed.position.load_state_dict(state)
    again = list(resumed.iter_epoch(0))
    assert [k for b in again for k in b["key"]] == keys[4:]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(again, batches[1:]))

    evals = list(build_eval_loader(str(broken), image_size=32, batch_size=8))
    assert [e["image"].shape for e in evals] == [(8, 2, 3, 32, 32), (7, 2, 3, 32, 32)]
    e, i = evals[0], evals[0]["key"].index(twin)  # no augmentation: the same picture reads the same
    assert torch.equal(e["image"][i, 0], e["image"][i, 1]) and lost not in [k for e in evals for k in e["key"]]


def _batch(n: int = 6) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(n, 2, 3, 64, 64, generator=g), "text": [STATEMENTS[i % 3] for i in range(n)],
            "meta": [{"label": i % 2 == 0} for i in range(n)], "key": [f"k{i}" for i in range(n)]}


def test_nlvr2_head_forward_backward_prunes_and_fits_a_batch():
    torch.manual_seed(0)
    model = build_model(load_config("tiny_albef_nlvr2").model).train()
    check_contract(model, "classify", "albef_nlvr2")
    batch = _batch(4)
    out = model(batch)
    assert out["tokens_per_layer"] == [65, 50, 50, 27]  # ELIP prunes each image, guided by the statement
    assert out["kept_patches"].shape == (8, 64)  # left 0, right 0, left 1, ...
    from pipeline.train.monitor import kept_patch_grid  # the trainer's image grid shows the pairs side by side

    assert kept_patch_grid(batch["image"], out["kept_patches"], model.patch_size, n=4).shape == (3, 2 + 2 * 66, 2 + 4 * 66)
    assert out["loss"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=0.3)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.cls_head.parameters())
    assert model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    # the right image matters: swapping the two images of a pair changes its logits
    model.eval()
    swapped = model.classify(batch["image"].flip(1), batch["text"])
    assert not torch.allclose(model.classify(batch["image"], batch["text"]), swapped)
    model.train()
    assert fit_batch(model, _batch(2), steps=10) < 0.3


def test_nlvr2_labels_come_from_key_json_and_a_missing_one_is_named():
    torch.manual_seed(0)
    model = build_model(load_config("tiny_albef_nlvr2").model)
    assert model.labels([{"label": True}, {"label": False}], "cpu").tolist() == [1, 0]
    batch = _batch(3)
    batch["meta"] = [{"label": True}, {"sentence": "x"}, {"label": "True"}]
    with pytest.raises(ValueError, match=r"samples \['k1', 'k2'\]: KEY.json has no boolean 'label'"):
        model(batch)
    batch["image"] = batch["image"][:, 0]
    with pytest.raises(ValueError, match=r"image pairs \[B, 2, 3, H, W\], got \[3, 3, 64, 64\]"):
        model(batch)


def test_init_from_an_albef_pretraining_copies_the_encoders_not_the_head(tmp_path):
    from pipeline.models.weights import init_from

    torch.manual_seed(1)
    albef = build_model(load_config("tiny_albef_elip").model)
    save_checkpoint(tmp_path / "run", albef.state_dict())
    torch.manual_seed(0)
    nlvr2 = build_model(load_config("tiny_albef_nlvr2").model)
    _, copied, kept = init_from(nlvr2, tmp_path / "run")
    assert set(copied) == {k for k in nlvr2.state_dict() if not k.startswith("cls_head.")}
    assert kept and all(k.startswith("cls_head.") for k in kept)
    fusion = "text_encoder.encoder.layer.3.crossattention.self.key.weight"
    assert torch.equal(nlvr2.state_dict()[fusion], albef.state_dict()[fusion])
    assert torch.equal(nlvr2.visual_encoder.patch_embed.proj.weight, albef.visual_encoder.patch_embed.proj.weight)


def test_classify_evaluation_on_synthetic_nlvr2_pairs(nlvr2_shards):
    clean = nlvr2_shards[0]
    labels = _labels(clean)
    true_share = 100 * sum(labels) / len(labels)
    torch.manual_seed(0)
    model = build_model(load_config("tiny_albef_nlvr2").model).eval()
    scores = {}
    for name, bias in (("always true", [0.0, 5.0]), ("always false", [5.0, 0.0])):
        with torch.no_grad():  # a constant head scores exactly its class's share
            model.cls_head[2].weight.zero_()
            model.cls_head[2].bias.copy_(torch.tensor(bias))
        scores[name] = evaluate_shards(model, str(clean), image_size=64, batch_size=8)
    m = scores["always true"]
    assert m["num_samples"] == 16 and m["chance"] == pytest.approx(max(true_share, 100 - true_share))
    assert m["accuracy"] == pytest.approx(true_share)
    assert scores["always false"]["accuracy"] == pytest.approx(100 - true_share)
