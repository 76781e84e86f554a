"""ALBEF's and BLIP's VQA heads: the answer weights and the weighted LM loss by hand, ALBEF's
ranking against brute force, each head's forward/backward with ELIP pruning, a fitted tiny batch
answered by ranking (ALBEF) and by generation (BLIP), init_from a pre-training run copying the
encoders and the decoder's sources, and ``python -m pipeline.eval vqa`` on a tiny ALBEF checkpoint."""
import json

import pytest
import torch
from transformers import BertConfig

from data_prep.__main__ import main as data_prep_main
from pipeline.config import load_config, save_config
from pipeline.eval.tasks import check_contract
from pipeline.eval.vqa import evaluate_shards, prepare, settings
from pipeline.models import build_model
from pipeline.models.answer_decoder import (AnswerDecoder, answer_weights, rank_answers, targets_from_meta,
                                            weighted_answer_loss)
from pipeline.models.weights import init_from
from tests.helpers_train import save_checkpoint

QUESTIONS = ["how many circles are there?", "is there a triangle?"]
METAS = [{"answers": ["two"] * 7 + ["three"] * 3, "question_id": 1}, {"answers": ["yes"] * 10, "question_id": 2}]


def _decoder() -> AnswerDecoder:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    config._attn_implementation = "sdpa"
    return AnswerDecoder(config, 2).eval()


def test_answer_weights_and_the_weighted_loss_by_hand():
    assert answer_weights(["two"] * 7 + ["three"] * 3) == (["two", "three"], [0.7, 0.3])
    texts, weights, counts = targets_from_meta(METAS)
    assert texts == ["two", "three", "yes"] and weights.tolist() == pytest.approx([0.7, 0.3, 1.0])
    assert counts.tolist() == [2, 1]
    dec = _decoder()
    ids = torch.tensor([[1, 5, 2, 0], [1, 6, 7, 2], [1, 8, 2, 0]])  # BOS answer EOS, padded
    mask = (ids != 0).long()
    states, states_mask = torch.randn(2, 3, 16), torch.tensor([[1, 1, 1], [1, 1, 0]])
    nll = [dec.sequence_nll(ids[i:i + 1], mask[i:i + 1], states[q:q + 1], states_mask[q:q + 1]).item()
           for i, q in enumerate([0, 0, 1])]
    logits = dec(ids[:1], mask[:1], states[:1], states_mask[:1]).log_softmax(-1)
    assert nll[0] == pytest.approx(-(logits[0, 0, 5] + logits[0, 1, 2]).item(), rel=1e-5)  # padding counts nothing
    loss = weighted_answer_loss(dec, ids, mask, weights, counts, states, states_mask)
    assert loss.item() == pytest.approx((0.7 * nll[0] + 0.3 * nll[1] + 1.0 * nll[2]) / 2, rel=1e-5)
    with pytest.raises(ValueError, match=r"questions \[7\]: KEY.json has no 'answers'"):
        targets_from_meta([{"answers": [], "question_id": 7}])


def test_ranking_takes_the_likeliest_answer_of_the_first_token_shortlist():
    dec = _decoder()
    ids = torch.tensor([[1, 5, 2, 0], [1, 6, 7, 2], [1, 8, 2, 0], [1, 9, 2, 0], [1, 6, 2, 0]])
    mask = (ids != 0).long()
    states, states_mask = torch.randn(3, 3, 16), torch.ones(3, 3, dtype=torch.long)
    full = torch.stack([-dec.sequence_nll(ids, mask, states[b:b + 1].expand(5, -1, -1), states_mask[b:b + 1].expand(5, -1))
                        for b in range(3)])  # [3, 5] every candidate's log-likelihood
    assert rank_answers(dec, states, states_mask, ids, mask, k=5).tolist() == full.argmax(1).tolist()
    first = dec(ids[:1, :1].expand(3, 1), torch.ones(3, 1, dtype=torch.long), states, states_mask)[:, 0]
    shortlist = first[:, ids[:, 1]].argmax(1)  # k=1: the first token decides (ties: the first such candidate)
    assert rank_answers(dec, states, states_mask, ids, mask, k=1).tolist() == shortlist.tolist()


def _fit(name: str, lr: float, steps: int):
    torch.manual_seed(0)
    model = build_model(load_config(name).model)
    check_contract(model, "vqa", name)
    batch = {"image": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), "text": QUESTIONS,
             "meta": METAS}
    out = model.train()(batch)
    assert out["tokens_per_layer"] == [65, 50, 50, 27]  # ELIP keeps pruning, guided by the question
    out["loss"].backward()
    assert model.text_decoder.encoder.layer[0].crossattention.self.query.weight.grad.abs().sum() > 0
    assert model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    model.eval()  # no dropout: a few steps fit the two questions
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = model(batch)["loss"]
        loss.backward()
        opt.step()
    return model, batch, loss.item()


def test_albef_head_fits_a_batch_and_ranks_the_fitted_answers():
    model, batch, loss = _fit("tiny_albef_vqa", 6e-3, 15)
    assert loss < 1.5  # the floor is 0.61 / 2: the 7-3 split of the first question's answers
    with pytest.raises(RuntimeError, match="no candidate answers"):
        model.answer_questions(batch["image"], QUESTIONS, k_test=3)
    model.set_answer_candidates(["no", "three", "red", "yes", "two"])
    assert model.answer_questions(batch["image"], QUESTIONS, **model.vqa_defaults) == ["two", "yes"]
    assert settings(model, {"k_test": 2, "num_beams": None}) == {"k_test": 2}
    with pytest.raises(ValueError, match=r"VQA settings \['num_beams'\] are not taken by AlbefVQA, which takes \['k_test'\]"):
        settings(model, {"num_beams": 3})


def test_blip_head_fits_a_batch_and_generates_the_fitted_answers():
    model, batch, loss = _fit("tiny_blip_vqa", 3e-3, 8)
    assert loss < 9.0  # from 15.5 (label smoothing 0.1 over the whole vocabulary keeps the floor near 2)
    assert model.answer_questions(batch["image"], QUESTIONS, **model.vqa_defaults) == ["two", "yes"]
    assert sorted(model.vqa_defaults) == ["max_new_tokens", "min_length", "num_beams"]


def _save(model, run, step: int = 1):
    save_checkpoint(run, model.state_dict(), step)


def test_init_from_pretraining_copies_encoders_and_starts_the_decoders_from_their_layers(tmp_path):
    torch.manual_seed(1)
    albef = build_model(load_config("tiny_albef_elip").model)
    _save(albef, tmp_path / "albef")
    torch.manual_seed(0)
    vqa = build_model(load_config("tiny_albef_vqa").model)
    _, copied, kept = init_from(vqa, tmp_path / "albef")
    assert kept == [] and any(k.startswith("visual_encoder.") for k in copied)
    fusion = albef.text_encoder.encoder.layer[2]  # text_layers 2: the decoder's layer 0 is fusion layer 2
    assert torch.equal(vqa.text_decoder.encoder.layer[0].crossattention.self.key.weight,
                       fusion.crossattention.self.key.weight)
    assert torch.equal(vqa.text_decoder.encoder.layer[1].attention.self.query.weight,
                       albef.text_encoder.encoder.layer[3].attention.self.query.weight)
    assert torch.equal(vqa.text_encoder.encoder.layer[2].output.dense.weight, fusion.output.dense.weight)
    assert torch.equal(vqa.text_decoder.cls.predictions.decoder.weight, albef.text_encoder.embeddings.word_embeddings.weight)
    # a fine-tuned VQA run's own decoder wins over the copy from its encoder
    with torch.no_grad():
        vqa.text_decoder.encoder.layer[0].crossattention.self.key.weight.add_(1.0)
    _save(vqa, tmp_path / "vqa")
    again = build_model(load_config("tiny_albef_vqa").model)
    init_from(again, tmp_path / "vqa")
    assert torch.equal(again.text_decoder.encoder.layer[0].crossattention.self.key.weight,
                       vqa.text_decoder.encoder.layer[0].crossattention.self.key.weight)

    torch.manual_seed(2)
    blip = build_model(load_config("tiny_blip_elip").model)
    _save(blip, tmp_path / "blip")
    blip_vqa = build_model(load_config("tiny_blip_vqa").model)
    _, copied, kept = init_from(blip_vqa, tmp_path / "blip")
    assert kept == []
    layer = blip_vqa.text_decoder.encoder.layer[1]
    assert torch.equal(layer.attention.self.value.weight, blip.text_decoder_attention[1].self.value.weight)
    assert torch.equal(layer.crossattention.self.value.weight, blip.text_encoder.encoder.layer[1].crossattention.self.value.weight)
    assert torch.equal(layer.intermediate.dense.weight, blip.text_encoder.encoder.layer[1].intermediate.dense.weight)
    assert torch.equal(blip_vqa.text_encoder.encoder.layer[1].attention.self.value.weight,
                       blip.text_encoder.encoder.layer[1].attention.self.value.weight)


def test_vqa_cli_ranks_the_training_answers_with_a_tiny_albef_checkpoint(tmp_path, capsys):
    from pipeline.eval.__main__ import main as eval_main

    train, test = tmp_path / "train", tmp_path / "test"
    for out, extra in ((train, []), (test, ["--eval"])):
        assert data_prep_main(["synthetic_vqa", "--num", "16", *extra, "--out", str(out), "--image-size", "64",
                               "--no-progress", "--workers", "1", "--min-shards", "1"]) == 0
    run = tmp_path / "run"
    cfg = load_config("tiny_albef_vqa", [f"train.run_dir={run}", f"data.train_shards={train}", "model.answers.top=5"])
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(3)
    model = build_model(cfg.model).eval()
    _save(model, run, step=4)
    assert eval_main(["vqa", "--run", str(run), "--shards", str(test), "--k-test", "3"]) == 0
    result = json.loads((run / "eval.json").read_text())
    prepare(model, str(train))
    assert len(model.candidates) == 5
    metrics, rows = evaluate_shards(model, str(test), image_size=64, batch_size=8, k_test=3)
    assert result["step"] == 4 and result["generate"] == {"k_test": 3} and result["num_questions"] == 16
    assert result["accuracy"] == pytest.approx(metrics["accuracy"])
    assert {r["answer"] for r in rows} <= set(model.candidates)
    assert "VQA accuracy" in capsys.readouterr().out
    assert eval_main(["vqa", "--run", str(run), "--shards", str(test), "--num-beams", "2"]) == 2
    assert "['num_beams'] are not taken by AlbefVQA" in capsys.readouterr().err
