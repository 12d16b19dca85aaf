"""Instruction accuracy: does the model answer the Shapes questions correctly, question type by question type?

Stage 3 trains on the Shapes instruct split: LLaVA-style conversations whose questions come from
``trainer.data.shapes._QUESTION_KINDS`` (colour, shape, count, exists, where, size, background, describe), each
answered from the scene that was drawn. So every question has an exact answer, and a model's answer can be
checked against it by *meaning*: a caption metric would reward the template words ("The ... is ...") that every
answer shares, whatever the image shows.

- ``instruction_records`` draws held-out scenes from their own random stream (``.../instruction_eval``, a name no
  training split uses), renders them and asks every question kind of them, ``n_per_kind`` questions per kind.
- ``answer_slot`` reduces an answer to the one thing the question asks for (its *slot*: a colour set, a number,
  yes / no, a region, ...), using the world's closed vocabulary (``analysis.grounding.shapes_vocabulary``), so
  "It is red." and "The circle is red." are the same answer. Text with no slot (nothing the question asks for, or
  a contradiction such as "top" and "bottom") has slot None and counts as wrong.
- ``score_answers`` is exact match of slots, per kind, with Wilson intervals (``stats.proportion_test``); the
  headline accuracy is the macro mean over kinds (each kind weighs the same, whatever its count).
- ``instruction_accuracy`` asks the model: greedy decoding of the chat-template prompt Stage 3 trains on
  (``<s>[INST] <image>\\n{question} [/INST]``), through ``extract.generate_captions``.

Every table of the world (colours, shapes, sizes, backgrounds) is read when a function runs, not at import, so a
world whose tables were swapped in place is scored in its own vocabulary.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence

from .captioning import chat_prompt
from .grounding import mentioned, shapes_vocabulary
from .stats import proportion_test

_WORD = re.compile(r"[a-z]+|\d+")
_NUMBERS = {
    w: i
    for i, w in enumerate(
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    )
}
_ROWS, _COLS = ("top", "bottom"), ("left", "right")
_CENTRE = ("centre", "center", "middle")


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("gray", "grey"))


def _stream(seed: int) -> random.Random:
    # The training splits draw from f"moe-vlm-shapes/{seed}/{split}" (trainer.data.shapes.generate_shapes); no
    # split is called "instruction_eval", so these scenes are not the training scenes.
    return random.Random(f"moe-vlm-shapes/{seed}/instruction_eval")


def question_kinds() -> tuple[str, ...]:
    """The Shapes question kinds, in the generator's order (``trainer.data.shapes._QUESTION_KINDS``)."""
    from trainer.data import shapes

    return tuple(shapes._QUESTION_KINDS)


def instruction_records(seed: int, n_per_kind: int, image_size: int = 64) -> list[dict]:
    """``n_per_kind`` held-out questions of every kind, each with its image and reference answer.

    Scenes come from ``random.Random(f"moe-vlm-shapes/{seed}/instruction_eval")`` through ``shapes.random_scene``
    and are rendered by ``shapes.render_scene``; each scene is asked every kind that still needs questions and
    that applies to it (the generator skips e.g. "which shape is red?" when two objects are red), with the
    generator's own question and answer functions, so questions and answers read exactly like the training
    conversations. Deterministic in ``seed``.

    Returns records ``{"id", "kind", "question", "answer", "image" (PIL RGB), "scene" (shapes.Scene)}``, grouped
    by scene, in the order drawn.
    """
    from trainer.data import shapes

    if n_per_kind < 0:
        raise ValueError(f"n_per_kind must be >= 0, got {n_per_kind}")
    rng = _stream(seed)
    kinds = dict(shapes._QUESTION_KINDS)  # read now: a shifted world may have replaced the generator's tables
    counts = dict.fromkeys(kinds, 0)
    records: list[dict] = []
    while any(c < n_per_kind for c in counts.values()):
        scene = shapes.random_scene(rng)
        image = None
        for kind, ask in kinds.items():
            if counts[kind] >= n_per_kind:
                continue
            qa = ask(scene, rng)
            if qa is None:  # the question does not apply to this scene
                continue
            image = image if image is not None else shapes.render_scene(scene, image_size)
            question, answer = qa
            records.append(
                {
                    "id": f"instruction-{kind}-{counts[kind]:05d}",
                    "kind": kind,
                    "question": question,
                    "answer": answer,
                    "image": image,
                    "scene": scene,
                }
            )
            counts[kind] += 1
    return records


def _number(tokens: Sequence[str]) -> int | None:
    """The first number written in digits or as a word (zero to ten)."""
    for t in tokens:
        if t.isdigit():
            return int(t)
        if t in _NUMBERS:
            return _NUMBERS[t]
    return None


def _region(tokens: Sequence[str]) -> str | None:
    """The region named: "top left", "top", "left", "centre"...; None when none is named or rows (columns)
    contradict each other ("top" and "bottom")."""
    words = set(tokens)
    row = [w for w in _ROWS if w in words]
    col = [w for w in _COLS if w in words]
    if len(row) > 1 or len(col) > 1:
        return None
    if row or col:  # "top centre" is the top: the centre word only names the middle row / column
        return " ".join(row + col)
    return "centre" if words.intersection(_CENTRE) else None


def _background(tokens: Sequence[str]) -> str | None:
    """The one background name in the text, matching longest names first ("light grey", not "grey"); None when
    none or several different ones are named."""
    from trainer.data import shapes

    text = f" {' '.join(tokens)} "
    found = set()
    for name in sorted(shapes.BACKGROUNDS, key=len, reverse=True):
        phrase = f" {' '.join(_tokens(name))} "
        if phrase in text:
            found.add(name)
            text = text.replace(phrase, " | ")  # a matched name cannot be matched again by a shorter one
    return found.pop() if len(found) == 1 else None


def _objects(tokens: Sequence[str], vocab: Mapping) -> frozenset[tuple[str | None, str]]:
    """(colour, shape) pairs: each shape word with the last colour word since the previous shape word (None when
    none: an object named without its colour matches no reference)."""
    shape_of = {form: label for label, forms in vocab["shape"].items() for form in forms}
    colour_of = {form: label for label, forms in vocab["colour"].items() for form in forms}
    pairs, colour = set(), None
    for t in tokens:
        if t in colour_of:
            colour = colour_of[t]
        elif t in shape_of:
            pairs.add((colour, shape_of[t]))
            colour = None
    return frozenset(pairs)


def answer_slot(kind: str, text: str):
    """The meaning of an answer ``text`` to a question of ``kind``, comparable with ``==``; None if it has none.

    - colour: frozenset of the object colours named ("One circle is red and the other is blue." -> {red, blue});
    - shape: frozenset of the shapes named (singular or plural);
    - count: the first number, in digits or words ("There are two shapes." -> 2);
    - exists: "yes" / "no", the first of the two words;
    - where: the region, "top left", "top", "left", "centre"... (row before column; "center" and "middle" count
      as "centre"; "top" with "bottom" is None);
    - size: the one size word named ("small", "medium", "large"; two different ones -> None);
    - background: the one background named, longest names first ("light grey"; "gray" reads as "grey");
    - describe: (frozenset of (colour, shape) pairs, background). Sizes and positions are left out (the size and
      where questions score them), and so is how many times a pair occurs.
    Unknown kinds raise ValueError.
    """
    from trainer.data import shapes

    tokens = _tokens(text)
    vocab = shapes_vocabulary()
    if kind in ("colour", "shape"):
        named = frozenset(mentioned(text, vocab[kind]))
        return named or None
    if kind == "count":
        return _number(tokens)
    if kind == "exists":
        return next((t for t in tokens if t in ("yes", "no")), None)
    if kind == "where":
        return _region(tokens)
    if kind == "size":
        named = [s for s in shapes.SIZES if s in tokens]
        return named[0] if len(named) == 1 else None
    if kind == "background":
        return _background(tokens)
    if kind == "describe":
        objects = _objects(tokens, vocab)
        return (objects, _background(tokens)) if objects else None
    raise ValueError(f"unknown question kind {kind!r}; known: {', '.join(question_kinds())}")


def score_answers(
    predictions: Sequence[str], records: Sequence[Mapping], ci: float = 0.95, n_examples: int = 2
) -> dict:
    """Exact-match accuracy of ``predictions`` (one answer text per record, in order) by question kind.

    A prediction is correct when its ``answer_slot`` is not None and equals the slot of the record's reference
    ``answer``. Returns dict(n, accuracy (macro: the mean of the per-kind accuracies, over kinds with
    questions), micro_accuracy (correct / n), by_kind {kind: {n, correct, unparsed (predictions with no slot),
    accuracy, ci_low, ci_high (Wilson interval, ``stats.proportion_test``), ci}}, criterion, examples (the first
    ``n_examples`` of each kind: kind, question, answer, prediction, correct)).
    """
    if len(predictions) != len(records):
        raise ValueError(
            f"got {len(predictions)} predictions for {len(records)} records; give one prediction per record"
        )
    known = question_kinds()
    seen = {str(r["kind"]) for r in records}
    order = [k for k in known if k in seen] + sorted(seen - set(known))
    tally = {k: {"n": 0, "correct": 0, "unparsed": 0} for k in order}
    examples: list[dict] = []
    shown = dict.fromkeys(order, 0)
    for prediction, record in zip(predictions, records):
        kind = str(record["kind"])
        reference = answer_slot(kind, record["answer"])
        if reference is None:
            raise ValueError(
                f"the reference answer {record['answer']!r} ({kind}) has no slot; it cannot be scored"
            )
        slot = answer_slot(kind, prediction)
        correct = slot is not None and slot == reference
        t = tally[kind]
        t["n"] += 1
        t["correct"] += int(correct)
        t["unparsed"] += int(slot is None)
        if shown[kind] < n_examples:
            shown[kind] += 1
            examples.append(
                {
                    "kind": kind,
                    "question": record["question"],
                    "answer": record["answer"],
                    "prediction": prediction,
                    "correct": correct,
                }
            )
    by_kind = {}
    for kind, t in tally.items():
        interval = proportion_test(t["correct"], t["n"], ci=ci)["interval"]
        by_kind[kind] = {
            **t,
            "accuracy": t["correct"] / t["n"],
            "ci_low": interval[0],
            "ci_high": interval[1],
            "ci": float(ci),
        }
    n = sum(t["n"] for t in tally.values())
    return {
        "n": n,
        "accuracy": sum(v["accuracy"] for v in by_kind.values()) / len(by_kind) if by_kind else None,
        "micro_accuracy": sum(t["correct"] for t in tally.values()) / n if n else None,
        "by_kind": by_kind,
        "criterion": "exact match of the answer's slot (analysis.instruction.answer_slot: the colours, shapes, "
        "number, yes/no, region, size, background or (colour, shape) pairs + background it names) with the "
        "reference answer's; accuracy is the macro mean over question kinds",
        "examples": examples,
    }


def instruction_prompt(processor, question: str) -> str:
    """The Stage 3 prompt for one question about one image (``captioning.chat_prompt``: the chat template's
    ``<s>[INST] <image>\\n{question} [/INST]``, the image before the question as in the training conversations)."""
    return chat_prompt(processor, question)


def instruction_accuracy(
    model, processor, records: Sequence[Mapping], max_new_tokens: int = 24, batch_size: int = 16
) -> dict:
    """Greedy answers of ``model`` to ``records`` (``instruction_records``) scored by ``score_answers``.

    Each question is asked on its own, in the chat format Stage 3 trains on (``instruction_prompt``); only the
    new tokens are decoded (``extract.generate_captions``, left-padded batches). The model runs in eval mode
    without gradients and is put back in the mode it was in. Adds what it ran (decoding, max_new_tokens,
    prompt_format).
    """
    from .extract import generate_captions

    records = list(records)
    keyed = [{**r, "id": f"{i}"} for i, r in enumerate(records)]  # generate_captions keys its answers by id
    prompts = [instruction_prompt(processor, r["question"]) for r in records]
    training = model.training
    model.eval()
    try:
        answers = generate_captions(
            model, processor, keyed, max_new_tokens=max_new_tokens, batch_size=batch_size, prompts=prompts
        )
    finally:
        model.train(training)
    result = score_answers([answers[r["id"]] for r in keyed], records)
    result.update(decoding="greedy", max_new_tokens=int(max_new_tokens), prompt_format="chat")
    return result


__all__ = [
    "answer_slot",
    "instruction_accuracy",
    "instruction_prompt",
    "instruction_records",
    "question_kinds",
    "score_answers",
]
