"""The demo's recipe learns: a tiny CLIP warm start, then the tiny ALBEF-ELIP initialised from
it (``train.init_from``), then ``python -m pipeline.eval retrieval``. The same commands as
``launch/demo.sh``, with fewer samples and steps and one rank."""
import json
import subprocess
import sys

import pytest

from tests.helpers_train import repo_root, subprocess_env, train_subprocess
from tests.test_train import metrics


def _itc_curve(run) -> list[float]:
    return [row["train/loss_itc"] for row in metrics(run) if "train/loss_itc" in row]


@pytest.mark.slow
def test_warm_started_tiny_albef_learns_retrieval(clip_warm_start, tmp_path):
    warm, run = clip_warm_start / "warm", tmp_path / "albef"
    train, test = clip_warm_start / "captions_train", clip_warm_start / "captions_test"
    clip = _itc_curve(warm)
    assert clip[-1] < 0.7 * clip[0], clip  # in-batch ITC over 32 pairs starts at ln 32 = 3.47

    r = train_subprocess("tiny_albef_elip", run, train, test, f"train.init_from={warm}", "optim.max_steps=100",
               "optim.warmup_steps=20")
    assert "initialised" in r.stderr and "from " + str(warm) in r.stderr
    itc = _itc_curve(run)
    # The first steps' keys include the queue's random initial features, which are easy to tell
    # apart; once real features fill the queue (256 / 32 = 8 steps) the loss peaks, then falls.
    assert itc[-1] < max(itc[1:4]) - 0.1, itc

    r = subprocess.run([sys.executable, "-m", "pipeline.eval", "retrieval", "--run", str(run), "--shards",
                        str(test), "--k-test", "16"],
                       cwd=repo_root(), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    m = json.loads((run / "eval.json").read_text())
    assert m["num_images"] == 100 and m["ranked_by"] == "itm"
    # the demo's bar: R@1 at least twice chance in both directions (chance is 1% here)
    assert m["txt_r1"] >= 2 * m["chance_txt_r1"] and m["img_r1"] >= 2 * m["chance_img_r1"], m


def test_init_from_copies_matching_weights_and_resyncs_the_teacher(tmp_path, monkeypatch):
    """Unit level (the slow test above reads a real DeepSpeed checkpoint): CLIP weights land in
    ALBEF's online encoders, ``copy_params`` carries them into the momentum encoders, the fusion
    layers keep their initialisation, and a checkpoint sharing no names is an error."""
    import torch

    from pipeline.config import load_config
    from pipeline.models import build_model
    from pipeline.models import weights

    torch.manual_seed(0)
    clip_state = build_model(load_config("tiny_clip").model).state_dict()
    monkeypatch.setattr(weights, "find_checkpoint", lambda path: tmp_path)
    monkeypatch.setattr(weights, "consolidated_state_dict", lambda tag_dir: clip_state)
    torch.manual_seed(1)
    albef = build_model(load_config("tiny_albef_elip").model)
    _, copied, kept = weights.init_from(albef, tmp_path)
    albef.copy_params()
    assert "visual_encoder.pos_embed" in copied and "text_encoder.embeddings.word_embeddings.weight" in copied
    assert any(k.startswith("text_encoder.encoder.layer.2.crossattention.") for k in kept)  # CLIP has no fusion
    state = albef.state_dict()
    for name in ("visual_encoder.pos_embed", "text_encoder.encoder.layer.1.output.dense.weight", "text_proj.weight",
                 "temp"):
        assert torch.equal(state[name], clip_state[name]), name
    assert torch.equal(albef.visual_encoder_m.pos_embed, clip_state["visual_encoder.pos_embed"])
    assert torch.equal(albef.text_proj_m.weight, clip_state["text_proj.weight"])

    with pytest.raises(ValueError, match="train.init_from"):
        weights.init_from(torch.nn.Linear(3, 3), tmp_path)


def test_init_from_fills_the_known_rows_of_a_grown_vocabulary(tmp_path, monkeypatch):
    """BLIP adds [ENC] / [DEC] to the vocabulary: the warm start's rows come first, the new rows
    keep their initialisation, and all four text layers come from a CLIP with four."""
    import torch

    from pipeline.config import load_config
    from pipeline.models import build_model, weights

    torch.manual_seed(0)
    clip_state = build_model(load_config("tiny_clip", ["model.text.text_layers=4"]).model).state_dict()
    monkeypatch.setattr(weights, "find_checkpoint", lambda path: tmp_path)
    monkeypatch.setattr(weights, "consolidated_state_dict", lambda tag_dir: clip_state)
    blip = build_model(load_config("tiny_blip_elip").model)
    key = "text_encoder.embeddings.word_embeddings.weight"
    before = blip.state_dict()[key].clone()
    _, copied, _ = weights.init_from(blip, tmp_path)
    after, known = blip.state_dict()[key], clip_state[key].shape[0]
    assert key in copied and after.shape[0] > known
    assert torch.equal(after[:known], clip_state[key]) and torch.equal(after[known:], before[known:])
    assert "text_encoder.encoder.layer.3.output.dense.weight" in copied
