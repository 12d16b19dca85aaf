"""Grounding accuracy: hand-written captions with known scores, record selection, and the model-running wiring on
a tiny random model (whatever it says, the score must be the score of what it said)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from analysis import grounding_accuracy, grounding_records, mentioned, score_caption, shapes_vocabulary


def test_vocabulary_is_the_shapes_world():
    from trainer.data.shapes import COLOURS, SHAPES

    vocab = shapes_vocabulary()
    assert set(vocab["shape"]) == set(SHAPES) and set(vocab["colour"]) == set(COLOURS)
    assert vocab["shape"]["cross"] == ("cross", "crosses")


@pytest.mark.parametrize(
    ("caption", "shape_ok", "colour_ok"),
    [
        ("A small red circle.", True, True),
        (
            "Two red circles on a white background.",
            True,
            True,
        ),  # plural; background colours are not object colours
        ("A RED Circle", True, True),  # case-insensitive
        ("A blue circle.", True, False),
        ("A red square.", False, True),
        ("A red circle and a blue square.", False, False),  # a second, wrong object is not grounded
        (
            "Redundant circular starlight.",
            False,
            False,
        ),  # whole words only: 'red' in 'redundant' is no colour
        ("", False, False),
        ("A heart that is red, in the top left.", False, True),
    ],
)
def test_score_caption_on_hand_written_captions(caption, shape_ok, colour_ok):
    score = score_caption(caption, "circle", "red")
    assert (score["shape_correct"], score["colour_correct"]) == (shape_ok, colour_ok)
    assert score["both_correct"] == (shape_ok and colour_ok)


def test_named_is_lenient_correct_is_strict():
    score = score_caption("A red circle and a blue square.", "circle", "red")
    assert score["shape_named"] and score["colour_named"]
    assert score["shapes"] == ["circle", "square"] and score["colours"] == ["blue", "red"]
    assert mentioned("three crosses", shapes_vocabulary()["shape"]) == {"cross"}


def _records():
    one = lambda i, s, c: {"id": f"t{i}", "objects": [{"shape": s, "colour": c, "size": "small"}]}  # noqa: E731
    two = {"id": "t9", "objects": [{"shape": "star", "colour": "red"}, {"shape": "heart", "colour": "blue"}]}
    return [
        one(0, "circle", "red"),
        two,
        one(1, "star", "green"),
        one(2, "cross", "pink"),
        one(3, "heart", "blue"),
    ]


def test_grounding_accuracy_counts_and_tests():
    records = grounding_records(_records())
    assert [r["id"] for r in records] == ["t0", "t1", "t2", "t3"]  # the two-object record is skipped
    assert [r["id"] for r in grounding_records(_records(), n=2)] == ["t0", "t1"]
    captions = {
        "t0": "A red circle.",
        "t1": "A green square.",  # colour only
        "t2": "Two pink crosses.",  # both (plural)
        "t3": "A red heart.",  # shape only
    }
    result = grounding_accuracy(captions, records)
    assert result["n"] == 4
    assert (
        result["shape_accuracy"] == 0.75
        and result["colour_accuracy"] == 0.75
        and result["both_accuracy"] == 0.5
    )
    assert result["chance"]["shape"] == 1 / 8 and result["tests"]["shape"]["successes"] == 3
    assert result["per_shape"]["star"] == 0.0 and result["per_shape"]["circle"] == 1.0
    assert result["per_shape"]["diamond"] is None
    assert [e["shape_correct"] for e in result["examples"]] == [True, False, True, True]
    assert json.loads(json.dumps(result, allow_nan=False))["n"] == 4
    with pytest.raises(KeyError):
        grounding_accuracy({"t0": "x"}, records)


def test_grounding_records_reads_a_dataset_by_its_objects_column():
    from datasets import Dataset

    rows = _records()
    data = Dataset.from_list([{"id": r["id"], "objects": r["objects"]} for r in rows])
    assert [r["id"] for r in grounding_records(data, n=3)] == ["t0", "t1", "t2"]
    assert grounding_records(Dataset.from_list([{"id": "x", "caption": "c"}])) == []


def test_caption_grounding_scores_what_the_model_generated(processor, tmp_path):
    from analysis.extract import generate_captions
    from analysis.grounding import caption_grounding
    from modeling_moe_vlm import MoeVlmForCausalLM
    from trainer.data import build_shapes

    shapes = build_shapes(
        tmp_path,
        seed=0,
        image_size=32,
        n_train=4,
        n_val=4,
        n_test=12,
        n_instruct=2,
        n_probe=1,
        n_compositional=1,
    )
    torch.manual_seed(0)
    model = MoeVlmForCausalLM(tiny_config()).eval()
    result = caption_grounding(model, processor, shapes["test"], n=4, max_new_tokens=4, batch_size=2)
    records = grounding_records(shapes["test"], 4)
    assert result["n"] == len(records) == 4 and result["max_new_tokens"] == 4
    expected = grounding_accuracy(generate_captions(model, processor, records, max_new_tokens=4), records)
    assert result["examples"] == expected["examples"]
    assert result["shape_accuracy"] == expected["shape_accuracy"]
    assert caption_grounding(model, processor, [{"id": "x"}], n=4)["n"] == 0
