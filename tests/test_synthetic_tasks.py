"""Synthetic VQA / NLVR2 / SNLI-VE sets: deterministic, balanced where promised, answers that
match the drawn objects, the real sets' schema, and the chance level in the manifest."""
import json
from collections import Counter

import pytest

from data_prep import synthetic_tasks as st
from data_prep.__main__ import main
from data_prep_fixtures import read_shards
from pipeline.eval.vqa_metric import vqa_accuracy

FAST = ["--no-progress", "--workers", "1", "--min-shards", "1"]


def _build(tmp_path, task, num, *extra):
    out = tmp_path / task
    assert main([f"synthetic_{task}", "--num", str(num), "--out", str(out), "--image-size", "32", *extra, *FAST]) == 0
    return out, json.loads((out / "manifest.json").read_text())


def test_vqa_answers_match_the_objects_and_the_chance_level(tmp_path, capsys):
    out, m = _build(tmp_path, "vqa", 200, "--shard-size", "80")
    samples = list(read_shards(out).values())
    assert len(samples) == 200 and m["sources"]["synthetic_vqa"]["task"] == "vqa"
    answers = Counter(s["json"]["answers"][0] for s in samples)
    assert m["sources"]["synthetic_vqa"]["chance"] == pytest.approx(max(answers.values()) / 200)
    assert f"chance level {100 * max(answers.values()) / 200:.1f}%" in capsys.readouterr().out
    # the questions give part of the answer away ("is there" is yes or no): well above chance
    assert m["sources"]["synthetic_vqa"]["text_only"] > 2 * m["sources"]["synthetic_vqa"]["chance"]
    for s in samples:
        j = s["json"]
        assert s["txt"] == j["question"] and len(j["answers"]) == 10 and len(set(j["answers"])) == 1
        assert vqa_accuracy(j["answers"][0], j["answers"]) == 1.0
        if j["question_type"] == "how many":
            shape = j["question"].split()[2][:-1]
            n = sum(g["count"] for g in j["objects"] if g["shape"] == shape)
            assert j["answers"][0] == st.COUNT_WORDS[n] and j["answer_type"] == "number"
        if j["question_type"] == "is there":
            present = j["question"].split()[-1][:-1] in {g["shape"] for g in j["objects"]}
            assert j["answers"][0] == ("yes" if present else "no")
    assert {s["json"]["question_type"] for s in samples} == {"how many", "what colour", "what shape", "where",
                                                            "is there"}


def test_nlvr2_statements_are_true_or_false_about_the_pair_and_balanced():
    labels = Counter()
    for i in range(200):
        ex = st.nlvr2_example(0, i)
        left, right = ex["groups"]["left.jpg"], ex["groups"]["right.jpg"]
        truth = dict(s for kind in st.nlvr2_statements(left, right) for s in kind)
        assert truth[ex["text"]] is ex["target"] is ex["meta"]["label"]
        labels[ex["target"]] += 1
    assert 80 <= labels[True] <= 120


def test_ve_labels_are_balanced_and_entailment_holds():
    labels = Counter()
    for i in range(300):
        ex = st.ve_example(0, i)
        labels[ex["target"]] += 1
        h, groups = ex["text"], ex["groups"]["jpg"]
        if h.startswith("there is no "):
            absent = h.split()[-1] not in {g["shape"] for g in groups}
            assert absent == (ex["target"] == "entailment")
    assert all(80 <= labels[k] <= 120 for k in st.VE_LABELS)


def test_pairs_schema_is_deterministic_and_eval_split_is_disjoint(tmp_path):
    out, m = _build(tmp_path, "nlvr2", 6)
    again, _ = _build(tmp_path / "again", "nlvr2", 6)
    a, b = read_shards(out), read_shards(again)
    assert a.keys() == b.keys() and all(a[k]["left.jpg"] == b[k]["left.jpg"] and a[k]["txt"] == b[k]["txt"] for k in a)
    s = next(iter(a.values()))
    assert set(s) == {"shard", "left.jpg", "right.jpg", "txt", "json"} and isinstance(s["json"]["label"], bool)
    assert s["json"]["original_size"] == {"left": [32, 32], "right": [32, 32]}
    test, mt = _build(tmp_path / "test", "ve", 6, "--eval")
    src = mt["sources"]["synthetic_ve_test"]
    assert src["eval"] is True and src["task"] == "snli_ve"
    train = [st.ve_example(0, i)["groups"] for i in range(6)]
    assert [st.ve_example(0, i, "test")["groups"] for i in range(6)] != train
    for v in read_shards(test).values():
        assert st.VE_LABELS[v["json"]["label_id"]] == v["json"]["label"] and v["txt"] == v["json"]["hypothesis"]
