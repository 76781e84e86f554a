"""The tiny EVLGen under DeepSpeed: two ranks (ZeRO-2) train the connector on synthetic shapes,
the trainer's caption evaluation runs at the end, and ``python -m pipeline.eval caption``
reloads the checkpoint (which leaves out the frozen ViT and LLM) and scores it next to the
untrained model: the trained one must caption clearly better."""
import json
import math
import subprocess
import sys

import pytest

from data_prep import synthetic
from pipeline.eval.__main__ import main as eval_main
from pipeline.models import weights
from pipeline.train import checkpoint as ckpt
from tests.helpers_evlgen import tiny_llm
from tests.helpers_train import repo_root, subprocess_env
from tests.test_train import _free_port, metrics, tensorboard

STEPS = 240


@pytest.mark.slow
def test_tiny_evlgen_two_ranks_learns_to_caption_and_reloads_without_frozen_weights(tmp_path, tmp_path_factory):
    llm = tiny_llm(tmp_path_factory.getbasetemp() / "tiny_llms", "opt", steps=300)  # LM-pretrained, frozen
    synthetic.build(tmp_path / "train", num=1024, image_size=64, shard_size=256, min_shards=1)
    # 3 evaluation shards for 2 ranks: rank 1 runs out of batches first and steps along on stand-ins
    synthetic.build(tmp_path / "eval", num=40, image_size=64, shard_size=14, split="test", captions_per_image=5,
                    min_shards=1)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "pipeline.train", "--config", "tiny_evlgen_opt", f"train.run_dir={run}",
           f"model.llm.pretrained={llm}", "model.llm.build_if_missing=false", f"data.train_shards={tmp_path / 'train'}",
           "data.batch_size=8", "data.workers=0", f"optim.max_steps={STEPS}", "train.log_every=40",
           "train.checkpoint_every=0", f"eval.every={STEPS}", f"eval.shards={tmp_path / 'eval'}", "eval.batch_size=20"]
    r = subprocess.run(cmd, cwd=repo_root(), env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    m = [row for row in metrics(run) if "train/loss" in row]
    assert [x["step"] for x in m] == list(range(40, STEPS + 1, 40))
    assert all(math.isfinite(x["train/loss"]) for x in m) and m[-1]["train/loss"] < m[0]["train/loss"]
    assert [m[-1][f"tokens/layer_{i:02d}"] for i in range(3)] == [65, 41, 21]  # TomeFormer merges
    history = [json.loads(line) for line in (run / "eval_history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == STEPS and history[-1]["num_images"] == 40  # both ranks' captions

    # the checkpoint holds the trainable part only: the frozen ViT and LLM come from their own files
    state = weights.consolidated_state_dict(ckpt.find_latest(run / "checkpoints"))
    assert any(k.startswith("connector.") for k in state) and "llm_proj.weight" in state
    assert not any(k.startswith(("llm.", "vision.vit.")) for k in state)

    assert eval_main(["caption", "--run", str(run), "--shards", str(tmp_path / "eval"), "--batch-size", "20",
                      "--compare-untrained"]) == 0
    result = json.loads((run / "eval.json").read_text())
    untrained = result["untrained"]
    for key in ("bleu_1", "bleu_4", "meteor", "rouge_l", "cider"):
        assert key in result and key in untrained
    # the reloaded weights caption exactly as the trainer's own evaluation did
    assert result["cider"] == pytest.approx(history[-1]["cider"], abs=1e-6)
    assert result["num_images"] == 40 and result["empty_captions"] == 0
    assert result["cider"] >= 1.5 * untrained["cider"] and result["cider"] >= untrained["cider"] + 20, (
        result["cider"], untrained["cider"], result["examples"][:3])
    captions = json.loads((run / "captions.json").read_text())
    assert len(captions) == 40 and len({c["caption"] for c in captions}) > 5  # it looks at the images
    acc = tensorboard(run)
    assert "eval/cider" in acc.Tags()["scalars"] and "eval/caption_0" in acc.Tags()["images"]
