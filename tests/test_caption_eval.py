"""Caption metrics through pycocoevalcap (Java for METEOR and the PTB tokenizer)."""
import pytest

from pipeline.eval.caption import METRICS, format_table, score_captions

REFS = {
    "a": ["two red circles at the top left", "at the top left two red circles", "a picture of two red circles"],
    "b": ["a blue square in the bottom right", "one blue square at the bottom right", "a blue square"],
}


def test_scores_rank_right_captions_above_wrong_ones():
    right = score_captions(REFS, {"a": "two red circles at the top left", "b": "a blue square in the bottom right"})
    wrong = score_captions(REFS, {"a": "three green triangles", "b": "three green triangles"})
    half = score_captions(REFS, {"a": "two red circles at the top left", "b": "three green triangles"})
    assert set(right) == set(METRICS)
    assert right["bleu_1"] == pytest.approx(100.0) and right["rouge_l"] == pytest.approx(100.0)
    for m in METRICS:
        assert right[m] > half[m] > wrong[m], m
    assert "CIDEr" in format_table(dict(right, num_images=2), wrong)


def test_mismatched_keys_and_empty_input_are_errors():
    with pytest.raises(ValueError, match="keys differ"):
        score_captions(REFS, {"a": "x"})
    with pytest.raises(ValueError, match="nothing to score"):
        score_captions({}, {})
