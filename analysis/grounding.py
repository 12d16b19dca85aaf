"""Grounding accuracy: does a caption of a single-object image name that object's shape and colour?

Corpus metrics (BLEU, CIDEr) reward a caption for the template words it shares with the references ("a",
"on a", "background"), so a captioner that ignores the image can score well on them. In the Shapes world the
answer to "is the caption grounded?" is exact: every test image lists its objects (``objects``: shape,
colour, size), and the vocabulary of shapes and colours is closed. So for each single-object test image:

- the caption *names the right shape* when the set of shape words it contains (singular or plural, whole
  words, case-insensitive) is exactly {the object's shape}: naming a wrong shape as well is not grounded
  (a caption listing every shape would otherwise score 1);
- likewise for the colour (the object colours only: background words such as "white" or "light grey" are
  not object colours in this world, so they do not count against a caption).

Each accuracy comes with a one-tailed binomial test against the chance level of guessing one class
(1 / number of shapes, 1 / number of colours) and a Wilson interval (``stats.proportion_test``).

``score_caption`` / ``grounding_accuracy`` are pure functions over strings; ``caption_grounding`` runs the
model (greedy, through ``extract.generate_captions`` with its default prompt) on the first ``n`` single-object
records of a split.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from .stats import proportion_test

_WORD = re.compile(r"[a-z]+")


def shapes_vocabulary() -> dict[str, dict[str, tuple[str, ...]]]:
    """The Shapes world's closed vocabulary: {"shape": {shape: (words...)}, "colour": {colour: (words...)}}.

    Shapes are named by their singular and plural ("cross", "crosses"); the world has no synonyms
    (its captions use exactly these words: trainer.data.shapes' templates), so each colour is one word.
    """
    from trainer.data.shapes import COLOURS, SHAPES, plural

    return {
        "shape": {s: (s, plural(s)) for s in SHAPES},
        "colour": {c: (c,) for c in COLOURS},
    }


def mentioned(caption: str, words: Mapping[str, Sequence[str]]) -> set[str]:
    """The labels of ``words`` ({label: (word, ...)}) whose any word occurs in ``caption`` as a whole word."""
    tokens = set(_WORD.findall(caption.lower()))
    return {label for label, forms in words.items() if tokens.intersection(f.lower() for f in forms)}


def score_caption(caption: str, shape: str, colour: str, vocabulary: Mapping | None = None) -> dict:
    """Score one caption of a single-object image whose object is ``shape`` in ``colour``.

    Returns dict(shape_correct, colour_correct, both_correct (the caption names exactly the right shape /
    colour / both), shape_named, colour_named (the right word occurs, wrong ones allowed), shapes, colours
    (the labels the caption mentions, sorted)).
    """
    vocab = shapes_vocabulary() if vocabulary is None else vocabulary
    shapes = mentioned(caption, vocab["shape"])
    colours = mentioned(caption, vocab["colour"])
    shape_ok, colour_ok = shapes == {shape}, colours == {colour}
    return {
        "shape_correct": shape_ok,
        "colour_correct": colour_ok,
        "both_correct": shape_ok and colour_ok,
        "shape_named": shape in shapes,
        "colour_named": colour in colours,
        "shapes": sorted(shapes),
        "colours": sorted(colours),
    }


def grounding_records(records: Sequence, n: int | None = None) -> list:
    """The first ``n`` (all when None) records with exactly one object; records need an ``objects`` list of
    {"shape", "colour", ...} (the Shapes caption splits). A ``datasets.Dataset`` is filtered on its
    ``objects`` column first, so only the chosen rows' images are decoded."""
    if hasattr(records, "column_names"):  # a datasets.Dataset: read one column, decode only what is kept
        if "objects" not in records.column_names:
            return []
        keep = [i for i, objects in enumerate(records["objects"]) if len(objects) == 1]
        return [records[i] for i in keep[:n]]
    out = []
    for record in records:
        objects = record.get("objects") if isinstance(record, Mapping) else None
        if objects is not None and len(objects) == 1:
            out.append(record)
            if n is not None and len(out) >= n:
                break
    return out


def grounding_accuracy(
    captions: Mapping[str, str], records: Sequence, vocabulary: Mapping | None = None, ci: float = 0.95
) -> dict:
    """Shape, colour and joint accuracy of ``captions`` ({id: caption}) on single-object ``records``.

    Every record's ``id`` must have a caption. Returns dict(n, shape_accuracy, colour_accuracy,
    both_accuracy, shape_named_rate, colour_named_rate, chance {shape, colour, both}, tests {shape, colour,
    both: ``stats.proportion_test`` against chance, with its Wilson interval}, per_shape {shape: accuracy},
    criterion (the rule, in words), examples [{id, caption, shape, colour, shape_correct, colour_correct}]).
    """
    vocab = shapes_vocabulary() if vocabulary is None else vocabulary
    rows = []
    for record in records:
        rid = str(record["id"])
        if rid not in captions:
            raise KeyError(f"no caption for record {rid!r}")
        (obj,) = record["objects"]
        score = score_caption(captions[rid], obj["shape"], obj["colour"], vocab)
        rows.append(
            {"id": rid, "caption": captions[rid], "shape": obj["shape"], "colour": obj["colour"], **score}
        )
    n = len(rows)
    count = {key: sum(r[key] for r in rows) for key in ("shape_correct", "colour_correct", "both_correct")}
    named = {key: sum(r[key] for r in rows) for key in ("shape_named", "colour_named")}
    chance = {"shape": 1 / len(vocab["shape"]), "colour": 1 / len(vocab["colour"])}
    chance["both"] = chance["shape"] * chance["colour"]
    per_shape = {}
    for shape in vocab["shape"]:
        mine = [r["shape_correct"] for r in rows if r["shape"] == shape]
        per_shape[shape] = sum(mine) / len(mine) if mine else None

    def share(k):
        return k / n if n else None

    return {
        "n": n,
        "shape_accuracy": share(count["shape_correct"]),
        "colour_accuracy": share(count["colour_correct"]),
        "both_accuracy": share(count["both_correct"]),
        "shape_named_rate": share(named["shape_named"]),
        "colour_named_rate": share(named["colour_named"]),
        "chance": chance,
        "tests": {
            "shape": proportion_test(count["shape_correct"], n, chance["shape"], ci),
            "colour": proportion_test(count["colour_correct"], n, chance["colour"], ci),
            "both": proportion_test(count["both_correct"], n, chance["both"], ci),
        },
        "per_shape": per_shape,
        "criterion": "the caption's shape (colour) words, whole words, singular or plural, are exactly the "
        "object's shape (colour); single-object images only",
        "examples": [
            {k: r[k] for k in ("id", "caption", "shape", "colour", "shape_correct", "colour_correct")}
            for r in rows
        ],
    }


def caption_grounding(
    model,
    processor,
    records: Sequence,
    *,
    n: int = 64,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    prompt_format: str | None = None,
) -> dict:
    """Greedy captions of the first ``n`` single-object ``records`` (``extract.generate_captions``; its default
    prompt unless ``prompt_format`` is given) scored by ``grounding_accuracy``; adds what it ran (decoding,
    tokens, prompt format).

    Records without an ``objects`` field (e.g. COCO) give ``{"n": 0, "skipped": <why>}``.
    """
    from .extract import generate_captions

    rows = grounding_records(records, n)
    if not rows:
        return {"n": 0, "skipped": "no single-object records with an `objects` field in this split"}
    extra = {} if prompt_format is None else {"prompt_format": prompt_format}
    captions = generate_captions(
        model, processor, rows, max_new_tokens=max_new_tokens, batch_size=batch_size, **extra
    )
    result = grounding_accuracy(captions, rows)
    result.update(
        decoding="greedy",
        max_new_tokens=int(max_new_tokens),
        prompt_format=prompt_format or "generate_captions default (raw)",
    )
    return result


__all__ = [
    "caption_grounding",
    "grounding_accuracy",
    "grounding_records",
    "mentioned",
    "score_caption",
    "shapes_vocabulary",
]
