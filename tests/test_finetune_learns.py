"""The tiny fine-tuning tasks learn: one warm start (the demo's tiny CLIP, trained briefly) and one
set of synthetic shards shared by every task, then per task ``python -m pipeline.train`` from the
warm start and ``python -m pipeline.eval`` on held-out shards, scored against the chance level
(captioning: against the same model untrained). The commands are those of
``launch/finetune_demo.sh``, with fewer samples and steps and one rank; a task is one more row of
``TASKS``. A two-rank fine-tuning run stopped by ``train.stop_at_step`` resumes to the straight
run's losses, evaluations and weights."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep import synthetic_tasks
from pipeline.models import weights
from pipeline.train import checkpoint as ckpt
from tests.helpers_train import repo_root, save_checkpoint, subprocess_env, train_subprocess
from tests.test_train import metrics, torchrun


def _retrieval_learned(m: dict) -> bool:
    return m["txt_r1"] >= 2 * m["chance_txt_r1"] and m["img_r1"] >= 2 * m["chance_img_r1"]


def _caption_learned(m: dict) -> bool:
    return m["cider"] >= 1.5 * m["untrained"]["cider"] and m["cider"] >= m["untrained"]["cider"] + 20


def _accuracy_learned(m: dict) -> bool:
    return m["accuracy"] >= m["chance"] + 10


# task: (config, train / test shard sets (fixture keys), training overrides, evaluation CLI arguments, learned?)
TASKS = {
    "retrieval": ("tiny_albef_retrieval", "captions", ["optim.max_steps=100"], ["retrieval", "--k-test", "16"],
                  _retrieval_learned),
    "caption": ("tiny_blip_caption", "captions", ["optim.max_steps=60"],
                ["caption", "--compare-untrained", "--limit", "40"], _caption_learned),
    "ve": ("tiny_albef_ve", "ve", ["optim.max_steps=60"], ["classify"], _accuracy_learned),
}


@pytest.fixture(scope="module")
def shared(clip_warm_start, tmp_path_factory):
    """Shards for every task and the warm start they all start from (conftest's tiny CLIP, shared
    with tests/test_albef_learns.py); the SNLI-VE shards are made here."""
    root = tmp_path_factory.mktemp("finetune")
    for name in ("captions_train", "captions_test", "warm"):
        (root / name).symlink_to(clip_warm_start / name)
    for split, num in (("train", 1000), ("test", 200)):
        synthetic_tasks.build("ve", root / f"ve_{split}", num=num, image_size=64, shard_size=500,
                              split=split, min_shards=1)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_tiny_fine_tuning_learns_above_chance(shared, task):
    config, data, overrides, evaluation, learned = TASKS[task]
    run, train, test = shared / task, shared / f"{data}_train", shared / f"{data}_test"
    r = train_subprocess(config, run, train, test, f"train.init_from={shared / 'warm'}", "optim.warmup_steps=10", *overrides)
    assert "initialised" in r.stderr and f"from {shared / 'warm'}" in r.stderr
    r = subprocess.run([sys.executable, "-m", "pipeline.eval", evaluation[0], "--run", str(run), "--shards", str(test),
                        *evaluation[1:]], cwd=repo_root(), env=subprocess_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    m = json.loads((run / "eval.json").read_text())
    assert learned(m), m


@pytest.mark.slow
def test_two_rank_fine_tuning_resumes_to_the_straight_run(tmp_path):
    """SNLI-VE on 2 ZeRO-2 CPU ranks, evaluated after each epoch: stopped at step 3 of 2 x 4 and
    resumed, it logs the same losses and evaluations and ends with the same weights."""
    import yaml

    from pipeline.config import load_config
    from pipeline.models import build_model

    for split, num in (("train", 32), ("test", 8)):
        synthetic_tasks.build("ve", tmp_path / f"ve_{split}", num=num, image_size=64, shard_size=16,
                              split=split, min_shards=1)
    torch.manual_seed(1)  # the pre-training run the task starts from: an ALBEF checkpoint
    albef = build_model(load_config("tiny_albef_elip").model)
    save_checkpoint(tmp_path / "pretrained", albef.state_dict())

    def config(name: str) -> Path:
        cfg = yaml.safe_load((repo_root() / "pipeline/configs/tiny_albef_ve.yaml").read_text())
        cfg["data"].update(train_shards=str(tmp_path / "ve_train"), batch_size=4, workers=0, shuffle_buffer=8)
        cfg["optim"].update(epochs=2, warmup_steps=2)
        cfg["train"].update(run_dir=str(tmp_path / name), init_from=str(tmp_path / "pretrained"), log_every=1,
                            checkpoint_every=0)
        cfg["eval"].update(every_epochs=1, shards=str(tmp_path / "ve_test"), batch_size=8)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    torchrun(config("straight"))
    resumed = config("resumed")
    torchrun(resumed, "train.stop_at_step=3")  # mid-epoch 0 (32 samples / (2 ranks x 4) = 4 steps per epoch)
    assert ckpt.find_latest(tmp_path / "resumed" / "checkpoints").name == "step00000003"
    r = torchrun(resumed)
    assert "resumed from" in r.stderr and "at step 3" in r.stderr and "initialised" not in r.stderr

    a, b = ([m for m in metrics(tmp_path / run) if "train/loss" in m] for run in ("straight", "resumed"))
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 9))
    for x, y in zip(a, b):
        for key in ("train/loss", "train/lr", "train/grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    evals = [[json.loads(line) for line in (tmp_path / run / "eval_history.jsonl").read_text().splitlines()]
             for run in ("straight", "resumed")]
    assert [e["step"] for e in evals[0]] == [e["step"] for e in evals[1]] == [4, 8]  # after each epoch
    assert [e["accuracy"] for e in evals[0]] == [e["accuracy"] for e in evals[1]]
    sa = weights.consolidated_state_dict(ckpt.find_latest(tmp_path / "straight" / "checkpoints"))
    sb = weights.consolidated_state_dict(ckpt.find_latest(tmp_path / "resumed" / "checkpoints"))
    assert sa.keys() == sb.keys() and "cls_head.0.weight" in sa
    torch.testing.assert_close(sa["visual_encoder.pos_embed"], albef.visual_encoder.pos_embed.detach(),
                               rtol=0.1, atol=0.05)  # started from the pre-training run, then moved a little
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6)
