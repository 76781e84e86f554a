"""METER's VQA head: soft scores and loss by hand, forward/backward with ELIP pruning, fitting a
tiny batch, answers through the VQA evaluation, the answer vocabulary from shards, init_from a
METER pre-training run's encoders."""
from collections import Counter

import pytest
import torch

from data_prep.__main__ import main as data_prep_main
from pipeline.config import load_config
from pipeline.eval.tasks import check_contract
from pipeline.eval.vqa import evaluate_shards
from pipeline.eval.vqa_answers import build_vocabulary, main as vqa_answers_main
from pipeline.models import build_model
from pipeline.models.meter_vqa import load_answers, soft_score, soft_targets, vqa_loss
from tests.helpers_train import save_checkpoint

QUESTIONS = ["how many circles are there?", "what colour is the square at the top left?", "is there a triangle?"]
ANSWERS = ["two", "red", "no"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(load_config("tiny_meter_vqa").model)


def _batch(n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(n, 3, 64, 64, generator=g), "text": [QUESTIONS[i % 3] for i in range(n)],
            "meta": [{"question_id": i, "answers": [ANSWERS[i % 3]] * 10} for i in range(n)]}


def test_soft_scores_and_loss_are_meters():
    assert [soft_score(c) for c in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    index = {"two": 0, "three": 1, "yes": 2}
    targets = soft_targets([["two"] * 3 + ["three"] + ["seven"] * 6, ["yes"] * 10], index)
    assert torch.allclose(targets, torch.tensor([[0.9, 0.3, 0.0], [0.0, 0.0, 1.0]]))  # "seven": not in the vocabulary
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    by_hand = sum(-(t * torch.log(torch.sigmoid(x)) + (1 - t) * torch.log(1 - torch.sigmoid(x)))
                  for x, t in zip(logits.flatten(), targets.flatten())) / 2  # mean over B*A, times A
    assert vqa_loss(logits, targets).item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_answer_list_errors_name_the_file(tmp_path):
    assert load_answers("synthetic_vqa_answers.json")[:3] == ["zero", "one", "two"]  # shipped with the configs
    with pytest.raises(FileNotFoundError, match="model.answers=.*nope.json: no such file"):
        load_answers(str(tmp_path / "nope.json"))
    (tmp_path / "rep.json").write_text('["yes", "no", "yes"]')
    with pytest.raises(ValueError, match="rep.json: answers repeat"):
        load_answers(str(tmp_path / "rep.json"))


def test_head_forward_backward_prunes_and_fits_a_batch(model):
    model.train()
    check_contract(model, "vqa", "meter_vqa")
    out = model(_batch(4))
    assert out["tokens_per_layer"] == [65, 59, 46, 30]  # ELIP keeps pruning while fine-tuning
    model.zero_grad(set_to_none=True)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.vqa_classifier.parameters())
    assert model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.cross_modal_image_layers[0].crossattention.self.query.weight.grad.abs().sum() > 0
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = _batch(3)
    for _ in range(25):
        opt.zero_grad()
        loss = model(batch)["loss"]
        loss.backward()
        opt.step()
    model.eval()
    assert model.answer_questions(batch["image"], batch["text"], prompt="ignored {}", num_beams=3) == ANSWERS


def test_questions_without_answers_are_named(model):
    batch = _batch(2)
    batch["meta"][1] = {"question_id": 77, "answers": []}
    with pytest.raises(ValueError, match=r"questions \[77\]: KEY.json has no human answers"):
        model(batch)


def test_answers_through_the_vqa_evaluation(model, tmp_path):
    out = tmp_path / "vqa"
    assert data_prep_main(["synthetic_vqa", "--num", "24", "--eval", "--out", str(out), "--image-size", "64",
                           "--no-progress", "--workers", "1", "--min-shards", "1"]) == 0
    model.eval()
    metrics, rows = evaluate_shards(model, str(out), image_size=64, batch_size=8)
    assert metrics["num_questions"] == 24 and all(r["answer"] in model.answers for r in rows)
    with torch.no_grad():  # a head that always says "yes" scores exactly the share of "yes" questions
        model.vqa_classifier[3].weight.zero_()
        model.vqa_classifier[3].bias.copy_(torch.nn.functional.one_hot(torch.tensor(model.answers.index("yes")),
                                                                        len(model.answers)) * 5.0)
    metrics, rows = evaluate_shards(model, str(out), image_size=64, batch_size=8)
    yes = sum(r["answers"][0] == "yes" for r in rows)
    assert 0 < yes < 24 and metrics["accuracy"] == pytest.approx(100 * yes / 24)
    # the vocabulary built from shards (METER's rule: majority answers seen min_count times)
    counts = Counter(r["answers"][0] for r in rows)
    assert build_vocabulary(str(out), min_count=2) == [a for a in counts if counts[a] >= 2]
    assert set(build_vocabulary(str(out), min_count=1)) <= set(model.answers)
    assert vqa_answers_main([str(out), "--min-count", "100", "--out", str(tmp_path / "a.json")]) == 1


def test_init_from_a_meter_pretraining_copies_encoders_and_fusion_not_the_head(tmp_path):
    from pipeline.models.weights import init_from

    torch.manual_seed(1)
    meter = build_model(load_config("tiny_meter_elip").model)
    save_checkpoint(tmp_path / "run", meter.state_dict())
    torch.manual_seed(0)
    vqa = build_model(load_config("tiny_meter_vqa").model)
    _, copied, kept = init_from(vqa, tmp_path / "run")
    assert kept and all(k.startswith("vqa_classifier.") for k in kept), kept
    for prefix in ("visual_encoder.", "text_transformer.", "cross_modal_text_layers.", "cross_modal_image_pooler.",
                   "token_type_embeddings."):
        assert any(k.startswith(prefix) for k in copied), prefix
    assert torch.equal(vqa.cross_modal_image_layers[1].output.dense.weight,
                       meter.cross_modal_image_layers[1].output.dense.weight)
