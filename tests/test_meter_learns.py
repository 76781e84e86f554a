"""The demo's METER recipe learns: METER starts from CLIP's ViT and a pre-trained text encoder,
so the tiny METER-ELIP is initialised (``train.init_from``, through METER's
``init_from_renames``) from the demo's tiny CLIP warm start trained with METER's ViT, then
evaluated by ``python -m pipeline.eval retrieval``. The commands of ``launch/demo.sh
RUN_DIR tiny_meter_elip``, with fewer samples and steps and one rank. From random encoders
METER's ITM stays at ln 2 (chance)."""
import json
import math
import subprocess
import sys

import pytest

from data_prep import synthetic
from tests.helpers_train import repo_root, subprocess_env
from tests.test_albef_learns import _itc_curve, _train
from tests.test_train import metrics

METER_VIT = ["model.vision.model_name=vit_base_patch32_clip_224",
             "model.vision.timm_kwargs={depth: 4, embed_dim: 64, num_heads: 2, patch_size: 16}"]


@pytest.mark.slow
def test_warm_started_tiny_meter_learns_retrieval(tmp_path):
    synthetic.build(tmp_path / "train", num=2000, image_size=64, shard_size=500, min_shards=1)
    synthetic.build(tmp_path / "eval", num=100, image_size=64, shard_size=100, split="test", captions_per_image=5,
                    min_shards=1)
    warm, run = tmp_path / "warm", tmp_path / "meter"
    evals = f"eval.shards={tmp_path / 'eval'}"
    _train("tiny_clip", warm, tmp_path / "train", evals, "optim.max_steps=300", "model.text.text_layers=4", *METER_VIT)
    clip = _itc_curve(warm)
    assert clip[-1] < 0.7 * clip[0], clip

    r = _train("tiny_meter_elip", run, tmp_path / "train", evals, f"train.init_from={warm}", "optim.max_steps=150",
               "optim.warmup_steps=20")
    assert "initialised" in r.stderr and "from " + str(warm) in r.stderr
    itm = [row["train/loss_itm"] for row in metrics(run) if "train/loss_itm" in row]
    assert max(itm[-3:]) < math.log(2) - 0.1, itm  # below chance (ln 2) and staying there

    r = subprocess.run([sys.executable, "-m", "pipeline.eval", "retrieval", "--run", str(run), "--shards",
                        str(tmp_path / "eval")],
                       cwd=repo_root(), env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    m = json.loads((run / "eval.json").read_text())
    assert m["num_images"] == 100 and m["ranked_by"] == "itm"
    assert m["txt_r1"] >= 2 * m["chance_txt_r1"] and m["img_r1"] >= 2 * m["chance_img_r1"], m


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
