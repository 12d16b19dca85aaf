"""Instruction accuracy (analysis.instruction): held-out Shapes questions, answer slots, exact-match scoring."""

from __future__ import annotations

import hashlib
import random

import pytest

from analysis.instruction import (
    answer_slot,
    instruction_accuracy,
    instruction_records,
    question_kinds,
    score_answers,
)


@pytest.fixture(scope="module")
def records():
    return instruction_records(seed=0, n_per_kind=40, image_size=32)


def _pixels(image) -> bytes:
    return hashlib.blake2b(image.tobytes(), digest_size=16).digest()


def test_records_cover_every_kind_with_images_and_references(records):
    kinds = question_kinds()
    assert set(kinds) == {"colour", "shape", "count", "exists", "where", "size", "background", "describe"}
    assert {k: sum(r["kind"] == k for r in records) for k in kinds} == dict.fromkeys(kinds, 40)
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert r["image"].size == (32, 32) and r["image"].mode == "RGB"
        assert r["question"].strip() and r["answer"].strip()


def test_every_reference_answer_has_a_slot_and_scores_itself_correct(records):
    for r in records:
        slot = answer_slot(r["kind"], r["answer"])
        assert slot is not None, r
        if r["kind"] == "describe":
            assert slot[1] == r["scene"].background and slot[0] == {
                (o.colour, o.shape) for o in r["scene"].objects
            }
    result = score_answers([r["answer"] for r in records], records)
    assert result["accuracy"] == result["micro_accuracy"] == 1.0
    assert all(v["accuracy"] == 1.0 and v["unparsed"] == 0 for v in result["by_kind"].values())


def test_slots_read_the_scene_the_question_is_about(records):
    """The slots agree with the drawn scene, not only with the answer text they came from."""
    for r in records:
        scene, slot = r["scene"], answer_slot(r["kind"], r["answer"])
        if r["kind"] == "count":
            assert slot == len(scene.objects)
        elif r["kind"] == "background":
            assert slot == scene.background
        elif r["kind"] == "where":
            assert slot in {o.region for o in scene.objects}
        elif r["kind"] == "size":
            assert slot in {o.size for o in scene.objects}
        elif r["kind"] == "colour":
            assert slot <= {o.colour for o in scene.objects}


@pytest.mark.parametrize(
    ("kind", "reference", "paraphrase", "wrong"),
    [
        ("colour", "The circle is red.", "It is red.", "It is blue."),
        ("colour", "One star is red and the other is blue.", "Blue and red.", "Both stars are red."),
        ("shape", "The red object is a cross.", "Crosses.", "It is a heart."),
        ("count", "There are two shapes.", "2", "There is one shape."),
        ("exists", "No, there is no blue star.", "no", "Yes, there is a blue star."),
        ("where", "It is in the top left.", "Top left of the image.", "It is at the top."),
        ("where", "It is in the centre.", "In the middle.", "It is on the right."),
        ("size", "The hexagon is medium.", "Medium.", "It is large."),
        ("background", "The background is light grey.", "Light gray.", "The background is dark grey."),
        (
            "describe",
            "There are two shapes on a black background: a small red circle in the top left and a large blue "
            "star at the bottom.",
            "A blue star and a red circle on a black background.",
            "A red star and a blue circle on a black background.",
        ),
        (
            "describe",
            "There are two shapes on a white background: a small red circle on the left and a large red star "
            "on the right.",
            "A red circle and a red star, white background.",
            "A red circle and a star on a white background.",  # the star's colour is not said
        ),
    ],
)
def test_slot_is_the_meaning_not_the_wording(kind, reference, paraphrase, wrong):
    assert answer_slot(kind, paraphrase) == answer_slot(kind, reference) is not None
    assert answer_slot(kind, wrong) != answer_slot(kind, reference)


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("colour", "I do not know."),
        ("count", "Several shapes."),
        ("exists", "There is a red circle."),
        ("where", "It is at the top and at the bottom."),
        ("size", "It is small or large."),
        ("background", "The background is grey."),
        ("background", "White or black."),
        ("describe", "A picture."),
        ("shape", ""),
    ],
)
def test_unparseable_answers_have_no_slot_and_count_wrong(kind, text):
    assert answer_slot(kind, text) is None
    record = {"kind": kind, "question": "q", "answer": text}
    reference = {"colour": "It is red.", "count": "There is one shape.", "exists": "Yes, there is a red circle.",
                 "where": "It is at the top.", "size": "It is small.", "background": "The background is white.",
                 "describe": "The image shows a small red circle at the top on a white background.",
                 "shape": "It is a circle."}[kind]  # fmt: skip
    result = score_answers([text], [{**record, "answer": reference}])
    assert result["by_kind"][kind]["correct"] == 0 and result["by_kind"][kind]["unparsed"] == 1


def test_a_shifted_world_is_read_when_called(monkeypatch):
    """Tables swapped after import (a shifted world) are the ones records and slots use; background names are
    matched longest first, so "light grey" is not read as "grey"."""
    from trainer.data import shapes

    monkeypatch.setattr(
        shapes, "COLOURS", {"teal": (0, 128, 128), "gold": (212, 175, 55), "navy": (0, 0, 128)}
    )
    monkeypatch.setattr(shapes, "BACKGROUNDS", {"grey": (128, 128, 128), "light grey": (200, 200, 200)})
    records = instruction_records(seed=0, n_per_kind=12, image_size=32)
    colours = set()
    for r in records:
        assert answer_slot(r["kind"], r["answer"]) is not None, r
        colours |= {o.colour for o in r["scene"].objects}
    assert colours == {"teal", "gold", "navy"}
    assert score_answers([r["answer"] for r in records], records)["accuracy"] == 1.0
    assert answer_slot("colour", "It is gold.") == {"gold"} and answer_slot("colour", "It is red.") is None
    assert answer_slot("background", "The background is light grey.") == "light grey"
    assert answer_slot("background", "The background is grey.") == "grey"
    assert answer_slot("background", "Grey or light grey.") is None


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown question kind"):
        answer_slot("colourfulness", "red")


def test_an_answer_for_another_scene_is_wrong(records):
    """Each kind's answers shuffled onto other records of that kind are wrong exactly where the slots differ."""
    rng = random.Random(0)
    predictions = [None] * len(records)
    for kind in question_kinds():
        index = [i for i, r in enumerate(records) if r["kind"] == kind]
        donors = index[:]
        rng.shuffle(donors)
        for i, j in zip(index, donors):
            predictions[i] = records[j]["answer"]
    result = score_answers(predictions, records)
    for kind in question_kinds():
        pairs = [(p, r) for p, r in zip(predictions, records) if r["kind"] == kind]
        differ = sum(answer_slot(kind, p) != answer_slot(kind, r["answer"]) for p, r in pairs)
        assert differ > 0, kind  # 40 questions: some donor always has another answer
        assert result["by_kind"][kind]["correct"] == len(pairs) - differ
    assert result["micro_accuracy"] < 1.0


def test_macro_and_micro_accuracy_differ_when_kinds_are_unbalanced():
    records = [{"kind": "count", "question": "How many?", "answer": "There is one shape."}] * 8 + [
        {"kind": "exists", "question": "Is there a red circle?", "answer": "Yes, there is a red circle."}
    ] * 2
    predictions = ["One."] * 6 + ["Two."] * 2 + ["No."] * 2  # count 6/8, exists 0/2
    result = score_answers(predictions, records)
    assert result["n"] == 10
    assert result["by_kind"]["count"]["accuracy"] == pytest.approx(0.75)
    assert result["by_kind"]["exists"]["accuracy"] == 0.0
    assert result["micro_accuracy"] == pytest.approx(0.6)
    assert result["accuracy"] == pytest.approx(0.375)
    assert list(result["by_kind"]) == ["count", "exists"]
    count = result["by_kind"]["count"]
    assert 0.0 <= count["ci_low"] < 0.75 < count["ci_high"] <= 1.0 and count["ci"] == 0.95
    assert result["examples"][0] == {
        "kind": "count",
        "question": "How many?",
        "answer": "There is one shape.",
        "prediction": "One.",
        "correct": True,
    }
    assert len(result["examples"]) == 4  # two per kind


def test_length_mismatch_names_both_lengths():
    records = [{"kind": "count", "question": "q", "answer": "There is one shape."}]
    with pytest.raises(ValueError, match=r"2 predictions for 1 records"):
        score_answers(["One.", "Two."], records)


def test_records_are_deterministic_in_the_seed(records):
    again = instruction_records(seed=0, n_per_kind=40, image_size=32)
    assert [(r["question"], r["answer"], r["scene"]) for r in again] == [
        (r["question"], r["answer"], r["scene"]) for r in records
    ]
    assert [_pixels(r["image"]) for r in again] == [_pixels(r["image"]) for r in records]
    other = instruction_records(seed=1, n_per_kind=40, image_size=32)
    assert [r["scene"] for r in other] != [r["scene"] for r in records]
    assert not {_pixels(r["image"]) for r in other} & {_pixels(r["image"]) for r in records}


def test_records_are_not_the_training_scenes(records):
    """Another stream than every training split of the same seed: no shared image, no shared scene."""
    from trainer.data import shapes

    def stream(split):
        return random.Random(f"moe-vlm-shapes/0/{split}")

    render = shapes._Renderer(32)
    train = shapes._caption_split("train", 100, stream("train"), render, 5)
    instruct = shapes._instruct_split(100, stream("instruct"), render)
    trained = set(render.seen)  # pixel hashes of every image those splits rendered
    assert len(trained) == len(train["id"]) + len(instruct["id"])
    assert not trained & {_pixels(r["image"]) for r in records}
    # The check can fail: the training streams' own scenes are found in that set.
    rng = stream("instruct")
    assert _pixels(shapes.render_scene(shapes.random_scene(rng), 32)) in trained


def test_instruction_accuracy_runs_the_model_end_to_end(tiny_model, processor):
    records = instruction_records(seed=3, n_per_kind=2, image_size=32)
    tiny_model.train()
    result = instruction_accuracy(tiny_model, processor, records, max_new_tokens=3, batch_size=8)
    assert tiny_model.training  # its mode is restored
    assert result["n"] == len(records) == 2 * len(question_kinds())
    assert list(result["by_kind"]) == list(question_kinds())
    for v in result["by_kind"].values():
        assert v["n"] == 2 and 0.0 <= v["accuracy"] <= 1.0 and 0.0 <= v["ci_low"] <= v["ci_high"] <= 1.0
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["micro_accuracy"] <= 1.0
    assert result["prompt_format"] == "chat" and result["max_new_tokens"] == 3
    assert all(isinstance(e["prediction"], str) for e in result["examples"])


def test_instruction_prompt_is_the_stage3_training_format(processor, red_image):
    """The eval prompt is the training conversation's prompt: the collator renders `<image>\\n{question}` turns."""
    from analysis.instruction import instruction_prompt
    from trainer.data.collator import MoeVlmCollator

    question = "What colour is the circle?"
    prompt = instruction_prompt(processor, question)
    assert prompt == f"<s>[INST] <image>\n{question} [/INST]"
    collator = MoeVlmCollator(processor)
    ids, _ = collator.prompt_ids(
        {"conversations": [{"from": "human", "value": f"<image>\n{question}"}], "image": red_image}
    )
    assert ids == processor.encode(prompt)
