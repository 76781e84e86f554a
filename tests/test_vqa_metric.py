"""VQA accuracy (pipeline.eval.vqa_metric) against hand-computed cases, and the official-file readers."""
import json

import pytest

from pipeline.eval.vqa_files import load_official, load_results, write_results
from pipeline.eval.vqa_metric import exact_match, normalize_answer, question_score, score, vqa_accuracy


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),              # number word, trailing period
    ("  The   Cat\n", "cat"),             # article, case, whitespace, newline
    ("an apple", "apple"),
    ("none", "0"),
    ("dont", "don't"),                    # contraction restored
    ("isnt it", "isn't it"),
    ("1,000", "1000"),                    # digit-comma-digit: every mark is deleted
    ("hello, world", "hello world"),      # a mark next to a space is deleted
    ("black-and-white", "black and white"),  # elsewhere it becomes a space
    ("yes!", "yes"),
    ("3.5", "3.5"),                       # a period before a digit stays
    ("e.g", "eg"),
    ("t-shirt", "t shirt"),
])
def test_normalisation_follows_the_official_rules(raw, expected):
    assert normalize_answer(raw) == expected
    assert normalize_answer(expected) == expected  # already-normalised answers are left alone


@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_ten_choose_nine_averaging(matching, expected):
    # n matches of 10: left-out matching answers see n-1 matches, the others n; each min(k/3, 1)
    answers = ["two"] * matching + ["three"] * (10 - matching)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)
    assert vqa_accuracy("Two.", answers) == pytest.approx(expected)


def test_accuracy_needs_answers_and_gqa_is_exact_match():
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("yes", [])
    assert exact_match("The Table.", "table") == 1.0 and exact_match("tables", "table") == 0.0
    assert question_score("left", ["left"], "gqa") == 1.0
    assert question_score("left", ["left"] * 10, "vqav2") == 1.0
    with pytest.raises(ValueError, match="one answer"):
        question_score("left", ["left", "right"], "gqa")


def test_score_overall_and_per_answer_type():
    qs = {1: {"answers": ["yes"] * 10, "answer_type": "yes/no"},
          2: {"answers": ["no"] * 10, "answer_type": "yes/no"},
          3: {"answers": ["two"] * 2 + ["3"] * 8, "answer_type": "number"},
          4: {"answers": ["red"] * 10, "answer_type": None}}
    out = score({1: "yes", 2: "yes", 3: "2", 4: "Red"}, qs)
    assert out["overall"] == pytest.approx(100 * (1 + 0 + 0.6 + 1) / 4)
    assert out["per_answer_type"] == pytest.approx({"number": 60.0, "yes/no": 50.0})
    assert out["num_questions"] == 4
    with pytest.raises(ValueError, match=r"no answer for 2 of 4 questions: 2, 4"):
        score({1: "yes", 3: "2"}, qs)
    with pytest.raises(ValueError, match=r"not in the annotations: 99"):
        score({1: "yes", 2: "no", 3: "2", 4: "red", 99: "x"}, qs)


def _official(tmp_path):
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
                 "questions": [{"image_id": 42, "question": "How many dogs?", "question_id": 420},
                               {"image_id": 42, "question": "Is it sunny?", "question_id": 421}]}
    annotations = {"info": {}, "data_subtype": "val2014", "annotations": [
        {"question_id": 420, "image_id": 42, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "2",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                     for i, a in enumerate(["2"] * 3 + ["3"] * 7)]},
        {"question_id": 421, "image_id": 42, "question_type": "is it", "answer_type": "yes/no",
         "multiple_choice_answer": "yes",
         "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]}]}
    q, a = tmp_path / "questions.json", tmp_path / "annotations.json"
    q.write_text(json.dumps(questions))
    a.write_text(json.dumps(annotations))
    return q, a


def test_official_files_and_results(tmp_path):
    q, a = _official(tmp_path)
    gt = load_official(q, a)
    assert gt[420]["answers"] == ["2"] * 3 + ["3"] * 7 and gt[420]["answer_type"] == "number"
    assert gt[421]["question"] == "Is it sunny?" and gt[421]["question_type"] == "is it"
    res = tmp_path / "results.json"
    res.write_text(json.dumps([{"question_id": 420, "answer": "two"}, {"question_id": 421, "answer": "Yes"}]))
    assert score(load_results(res), gt)["overall"] == pytest.approx(95.0)
    write_results(tmp_path / "written.json", {420: "3", 421: "no"})
    assert json.loads((tmp_path / "written.json").read_text()) == [{"question_id": 420, "answer": "3"},
                                                                   {"question_id": 421, "answer": "no"}]
    assert load_results(tmp_path / "written.json") == {420: "3", 421: "no"}
    res.write_text(json.dumps([{"question_id": 420, "answer": "two"}, {"question_id": 420, "answer": "3"}]))
    with pytest.raises(ValueError, match="question_id 420 is answered twice"):
        load_results(res)
    res.write_text(json.dumps({"420": "two"}))
    with pytest.raises(ValueError, match=f"{res}: expected a list"):
        load_results(res)
    a.write_text("{broken")
    with pytest.raises(ValueError, match=f"{a}: not valid JSON"):
        load_official(q, a)
    a.write_text(json.dumps({"annotations": [{"question_id": 7, "answers": [{"answer": "x"}]}]}))
    with pytest.raises(ValueError, match="question_id 7, which is not in"):
        load_official(q, a)


def test_vqa_score_command(tmp_path, capsys):
    from pipeline.eval.__main__ import main

    q, a = _official(tmp_path)
    res = tmp_path / "results.json"
    res.write_text(json.dumps([{"question_id": 420, "answer": "Two"}, {"question_id": 421, "answer": "no"}]))
    assert main(["vqa-score", "--questions", str(q), "--annotations", str(a), "--results", str(res), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == {"overall": pytest.approx(45.0),
                                   "per_answer_type": {"number": pytest.approx(90.0), "yes/no": 0.0}}
    assert any("number" in line and "90.00" in line for line in out[:-1])

    res.write_text(json.dumps([{"question_id": 421, "answer": "yes"}]))
    assert main(["vqa-score", "--questions", str(q), "--annotations", str(a), "--results", str(res)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(res) in err and "no answer for 1 of 2 questions: 420" in err
