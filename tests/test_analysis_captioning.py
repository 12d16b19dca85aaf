"""COCO caption metrics through pycocoevalcap (Java). One METEOR JVM for the module (~10 s)."""

from __future__ import annotations

import json
import shutil

import pytest

from analysis import CaptionEvaluator, caption_metrics, validate_captions

REFERENCES = {
    1: ["A red car parked on the street.", "a red car on a road"],
    2: ["Two dogs play with a ball in the park.", "dogs playing in a park"],
    3: ["A plate of food with broccoli and rice.", "a plate with rice and broccoli"],
}
IDENTICAL = {i: refs[0] for i, refs in REFERENCES.items()}
WRONG = {**IDENTICAL, 2: "a man riding a surfboard on a wave"}
# The first references again, differing only in case and punctuation -- both ways round (punctuation and capitals
# dropped, added, moved), so that skipping the PTB tokenizer on either side changes the tokens the scorers see.
RECASED = {
    1: "a red car parked on the street",
    2: "TWO DOGS PLAY, WITH A BALL IN THE PARK!",
    3: "A plate of food with broccoli and rice ...",
}

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs a Java runtime")


@pytest.fixture(scope="module")
def scores():
    """Identical and one-wrong predictions scored with one METEOR process."""
    with CaptionEvaluator() as evaluator:
        return evaluator.evaluate(IDENTICAL, REFERENCES), evaluator.evaluate(
            WRONG, REFERENCES, per_image=True
        )


@needs_java
def test_identical_captions_score_perfectly(scores):
    identical, _ = scores
    assert identical["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert identical["METEOR"] > 0.9
    assert identical["ROUGE_L"] == pytest.approx(1.0)
    assert identical["CIDEr"] > 0
    assert identical["scaled"]["CIDEr"] == pytest.approx(100 * identical["CIDEr"])
    assert identical["n_images"] == 3 and identical["n_references"] == 6
    json.dumps(identical, allow_nan=False)


@needs_java
def test_a_wrong_caption_scores_lower(scores):
    identical, wrong = scores
    for metric in ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert wrong[metric] < identical[metric], metric
    assert wrong["per_image"][2]["CIDEr"] < wrong["per_image"][1]["CIDEr"]


@needs_java
def test_empty_predictions_are_counted_and_scored_zero():
    preds = {1: "", 2: IDENTICAL[2], 3: "   "}  # empty first, last and blank
    result = caption_metrics(preds, REFERENCES, meteor=False, per_image=True)
    assert result["n_empty_predictions"] == 2 and result["empty_prediction_ids"] == [1, 3]
    assert result["METEOR"] is None
    assert result["per_image"][1]["ROUGE_L"] == 0.0 and result["per_image"][2]["ROUGE_L"] == pytest.approx(
        1.0
    )


@needs_java
def test_case_and_punctuation_do_not_change_the_scores():
    """COCO's scores are of PTB tokens (lower-cased, punctuation dropped) on both sides, so a prediction that
    differs from its reference only in case and punctuation scores as the exact match does: BLEU and ROUGE-L
    perfect, CIDEr and every per-image score equal. (Only this module's other tests use character-identical
    captions, where scoring raw strings would pass too.)"""
    with CaptionEvaluator(meteor=False) as evaluator:
        exact = evaluator.evaluate(IDENTICAL, REFERENCES, per_image=True)
        recased = evaluator.evaluate(RECASED, REFERENCES, per_image=True)
    assert recased["Bleu_4"] == pytest.approx(1.0, abs=1e-6) and recased["ROUGE_L"] == pytest.approx(1.0)
    for metric in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert recased[metric] == pytest.approx(exact[metric]), metric
    for i, scores_of_image in exact["per_image"].items():
        assert recased["per_image"][i] == pytest.approx(scores_of_image), i


def test_invalid_input_names_the_ids():
    with pytest.raises(ValueError, match=r"without references: 'x'"):
        validate_captions({"x": "a cat"}, {})
    with pytest.raises(ValueError, match=r"without predictions: 2, 3"):
        caption_metrics({1: "a car"}, REFERENCES)
    with pytest.raises(ValueError, match=r"empty reference lists: 1"):
        caption_metrics({1: "a car"}, {1: []})
    with pytest.raises(ValueError, match=r"not lists of strings: 1"):
        caption_metrics({1: "a car"}, {1: "a car"})


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="default-jre-headless"):
        caption_metrics(IDENTICAL, REFERENCES)
