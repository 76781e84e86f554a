"""EVLGen zero-shot VQA: batched answers with left-padded prompts equal one-by-one answers, the
prompt template is checked, and ``python -m pipeline.eval vqa`` on a tiny EVLGen checkpoint
answers a synthetic VQA shard set, writes eval.json, the official results file and TensorBoard
scalars, and scores exactly what the results file scores."""
import json

import pytest
import torch

from data_prep.__main__ import main as data_prep_main
from pipeline.config import ConfigError, load_config, save_config
from pipeline.eval.__main__ import main as eval_main
from pipeline.eval.vqa import answer_on_shards, clean_answer, score_rows
from pipeline.eval.vqa_files import load_results
from pipeline.eval.vqa_metric import vqa_accuracy
from pipeline.models.evlgen import EVLGen, VqaGenerateConfig
from pipeline.train.loop import _eval_task
from tests.helpers_evlgen import tiny_config, tiny_llm
from tests.test_train import tensorboard

QUESTIONS = ["how many circles are there?", "what colour is the square at the top left of the picture?"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return tiny_llm(tmp_path_factory.getbasetemp() / "tiny_llms", "opt")


def _model(llm_dir: str) -> EVLGen:
    torch.manual_seed(0)
    return EVLGen(tiny_config(llm_dir)).eval()


def test_batched_answers_with_left_padding_equal_one_by_one_answers(llm):
    model = _model(llm)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    kwargs = dict(model.vqa_defaults, max_new_tokens=5, min_length=3, num_beams=2)
    assert kwargs["prompt"] == "Question: {} Short answer:"
    together = model.answer_questions(images, QUESTIONS, **kwargs)
    alone = [model.answer_questions(images[i:i + 1], [q], **kwargs)[0] for i, q in enumerate(QUESTIONS)]
    assert together == alone and all(isinstance(a, str) for a in together)
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        model.answer_questions(images, QUESTIONS[:1], **kwargs)


def test_a_prompt_without_one_placeholder_is_refused():
    with pytest.raises(ValueError, match=r"model.vqa.prompt='Question: \{q\}': a VQA prompt needs exactly one"):
        VqaGenerateConfig(prompt="Question: {q}")
    with pytest.raises(ConfigError, match="model.vqa.prompt"):
        load_config("tiny_evlgen_opt", ["model.vqa.prompt=no placeholder"])


def test_answers_are_cleaned_and_rows_scored_by_their_dataset_rule():
    assert clean_answer(" Two.\nQuestion: what") == "two"
    row = dict(question_id=1, question="q", answer="two", answer_type="number", dataset="synthetic_vqa")
    m = score_rows([dict(row, answers=["2"] * 3 + ["3"] * 7), dict(row, question_id=2, answers=["3"] * 10)])
    assert m["accuracy"] == pytest.approx(100 * vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) / 2)
    assert m["per_answer_type"] == {"number": m["accuracy"]} and m["scored"]
    assert score_rows([dict(row, dataset="gqa", answers=["Two"])])["accuracy"] == 100.0
    assert not score_rows([dict(row, answers=[])])["scored"]  # test-dev: answered, not scored
    with pytest.raises(ValueError, match="mix datasets"):
        score_rows([dict(row, answers=["2"]), dict(row, question_id=2, dataset="gqa", answers=["2"])])
    with pytest.raises(ValueError, match="1 of 2 questions have no human answers"):
        score_rows([dict(row, answers=["2"]), dict(row, question_id=2, answers=[])])


def test_eval_task_picks_vqa_for_the_trainer_and_refuses_unknown_names():
    cfg = load_config("tiny_evlgen_opt", ["eval.every=10", "eval.shards=x", "eval.task=vqa"])
    assert _eval_task(cfg) == "vqa"
    assert _eval_task(load_config("tiny_evlgen_opt", ["eval.every=10", "eval.shards=x"])) == "caption"
    with pytest.raises(KeyError, match="evaluation 'vq' is not known"):
        _eval_task(load_config("tiny_evlgen_opt", ["eval.every=10", "eval.shards=x", "eval.task=vq"]))


def _checkpoint(model: EVLGen, run, step: int) -> None:
    """A checkpoint as the trainer writes it with ``exclude_frozen_parameters`` (module weights of
    the trainable part, ``meta.json`` last), without a DeepSpeed engine."""
    tag = run / "checkpoints" / f"step_{step}"
    tag.mkdir(parents=True)
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    torch.save({"module": {k: v for k, v in model.state_dict().items() if k not in frozen}},
               tag / "mp_rank_00_model_states.pt")
    (tag / "meta.json").write_text(json.dumps({"step": step}))
    (run / "checkpoints" / "latest").write_text(tag.name)


def test_zero_shot_vqa_cli_on_a_tiny_evlgen_checkpoint(llm, tmp_path, capsys):
    shards = tmp_path / "vqa"
    assert data_prep_main(["synthetic_vqa", "--num", "12", "--eval", "--out", str(shards), "--image-size", "64",
                           "--no-progress", "--workers", "1", "--min-shards", "1"]) == 0
    run = tmp_path / "run"
    cfg = load_config("tiny_evlgen_opt", [f"train.run_dir={run}", f"model.llm.pretrained={llm}",
                                          "model.llm.build_if_missing=false"])
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(5)
    trained = EVLGen(cfg.model)
    with torch.no_grad():  # a connector unlike the one the CLI would build from the seed alone
        trained.llm_proj.weight.mul_(3.0)
    _checkpoint(trained, run, step=7)

    assert eval_main(["vqa", "--run", str(run), "--shards", str(shards), "--batch-size", "5", "--num-beams", "2",
                      "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((run / "eval.json").read_text())
    assert result["step"] == 7 and result["num_questions"] == 12 and result["dataset"] == "synthetic_vqa"
    assert result["generate"] == dict(prompt="Question: {} Short answer:", max_new_tokens=3, min_length=1,
                                      num_beams=2, length_penalty=-1.0)
    assert 0.0 <= result["chance"] <= 1.0 and f"chance {100 * result['chance']:.2f}" in printed
    answers = load_results(run / "vqa_results.json")  # the official submission format
    assert sorted(answers) == list(range(12))
    # the checkpoint's weights answered (not the seed's), and eval.json scores what the results
    # file holds under the official rule
    rows = answer_on_shards(trained.eval(), str(shards), image_size=64, batch_size=12, num_beams=2, max_new_tokens=3)
    assert {r["question_id"]: r["answer"] for r in rows} == answers
    expected = 100 * sum(vqa_accuracy(answers[r["question_id"]], r["answers"]) for r in rows) / 12
    assert result["accuracy"] == pytest.approx(expected)
    assert set(result["per_answer_type"]) <= {"number", "yes/no", "other"} and result["per_answer_type"]
    assert [e.step for e in tensorboard(run).Scalars("eval/vqa_accuracy")] == [7]
