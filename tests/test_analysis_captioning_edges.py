"""Edges of the COCO caption scoring (`analysis.captioning`) that `make mutation` found untested. Without METEOR:
no JVM beyond the PTB tokenizer's."""

from __future__ import annotations

import pytest

from analysis.captioning import METRICS, CaptionEvaluator, caption_metrics


def test_one_image_gets_the_cider_note_and_per_image_scores_only_on_request():
    one = caption_metrics({"a": "a red circle"}, {"a": ["a red circle"]}, meteor=False)
    assert any("single image" in note for note in one["notes"]) and "per_image" not in one
    two = caption_metrics(
        {"a": "a red circle", "b": "two stars"},
        {"a": ["a red circle"], "b": ["two blue stars"]},
        meteor=False,
        per_image=True,
    )
    assert not any("single image" in note for note in two["notes"])
    assert (
        set(two["per_image"]) == {"a", "b"}
        and two["per_image"]["a"]["Bleu_1"] > two["per_image"]["b"]["Bleu_1"]
    )


def test_an_evaluator_gives_per_image_scores_only_on_request():
    with CaptionEvaluator(meteor=False) as evaluator:
        predictions, references = (
            {"a": "a red circle", "b": "two stars"},
            {"a": ["a red circle"], "b": ["two stars"]},
        )
        assert "per_image" not in evaluator.evaluate(predictions, references)
        per_image = evaluator.evaluate(predictions, references, per_image=True)["per_image"]
        assert set(per_image) == {"a", "b"}
        assert set(per_image["a"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}


def test_which_recipes_trained_on_conversations():
    from analysis.captioning import _trained_on_conversations

    assert _trained_on_conversations({"stage": 3}) and _trained_on_conversations({"stage": "3"})
    assert not _trained_on_conversations({"stage": 2})
    assert _trained_on_conversations({"stage": 2, "train_split": "instruct"})
    assert not _trained_on_conversations({"stage": 3, "train_split": "train"})
    assert _trained_on_conversations({"stage": 1, "dataset": "llava"})


def test_the_metrics_are_coco_captions_and_meteor_is_on_by_default():
    fast = caption_metrics({"a": "a red circle", "b": "two stars"}, {"a": ["a red circle"], "b": ["two stars"]},
                           meteor=False)  # fmt: skip
    assert set(METRICS) <= set(fast) and fast["METEOR"] is None and "Bleu_5" not in fast
    full = caption_metrics(
        {"a": "a red circle", "b": "two stars"}, {"a": ["a red circle"], "b": ["two stars"]}
    )
    assert full["METEOR"] is not None and all(full[m] is not None for m in METRICS)


def test_predictions_and_references_must_both_be_mappings():
    from analysis.captioning import validate_captions

    good_pred, good_refs = {"a": "a red circle"}, {"a": ["a red circle"]}
    assert validate_captions(good_pred, good_refs)["n_images"] == 1
    for pred, refs in ((["a red circle"], good_refs), (good_pred, [["a red circle"]])):
        with pytest.raises(ValueError, match="must be {id: str} and references"):
            validate_captions(pred, refs)


@pytest.mark.parametrize(
    "refs",
    [{"a": "a red circle"}, {"a": 5}, {"a": ["a red circle", 5]}, {"a": ("a red circle", None)}],
    ids=["bare-string", "not-a-sequence", "non-string-in-list", "non-string-in-tuple"],
)
def test_references_must_be_lists_of_strings(refs):
    """A bare string is a Sequence of characters: it must be refused, not scored as one-letter references."""
    from analysis.captioning import validate_captions

    with pytest.raises(ValueError, match="references that are not lists of strings: 'a'"):
        validate_captions({"a": "a red circle"}, refs)
    assert validate_captions({"a": "a red circle"}, {"a": ("a red circle",)})["n_references"] == 1
