"""Attribute-object binding in the concept matrix (paper section 3.3, Figure 8).

The concepts here are colour x object compounds ("red_circle", "green_circle", ...) and optionally
two-object scenes ("red_circle+blue_square"). The matrix is the same cosine similarity as
``similarity.concept_matrix`` (rows = images of compound i, columns = text of compound j). The paper's
finding is *object dominance*: 'red apple' text is as close to green-apple images as to red-apple ones,
i.e. colour is not bound to the object. ``binding_score`` turns that into numbers:

- attribute binding: for the text of (c, o), is it closer to images of (c, o) than to images of the
  same object in another colour (c', o)? One comparison per such pair;
- object control: same, against images of another object in the same colour (c, o'); high values with
  low attribute binding are exactly object dominance;
- swap binding: for the text of scene "c1_o1+c2_o2", is it closer to its images than to the images of
  the swapped scene "c2_o1+c1_o2" (same words, other binding)? A bag-of-words representation cannot win.

Each comparison is won when the matching entry is strictly larger; a tie counts as half a win (so a
representation blind to colour scores exactly 0.5, the chance level). Each block reports the fraction
won, the mean margin (matching minus competing similarity) and the counts. The main direction is text
-> image (compare entries within a column); the image -> text direction (within a row) is reported too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._arrays import to_numpy
from .similarity import concept_matrix

Part = tuple[str, str]  # (colour, object)


def parse_compound(compound: str | Sequence) -> tuple[Part, ...]:
    """Parse a compound name into its (colour, object) parts.

    "red_circle" -> (("red", "circle"),); "red_circle+blue_square" -> (("red", "circle"),
    ("blue", "square")). The colour is the text before the FIRST underscore, so objects may contain
    underscores ("red_traffic_light") but colours may not; pass a (colour, object) tuple, or a tuple of
    such tuples, to avoid the convention.
    """
    if isinstance(compound, str):
        parts = []
        for piece in compound.split("+"):
            colour, sep, obj = piece.strip().partition("_")
            if not sep or not colour or not obj:
                raise ValueError(f"cannot parse {compound!r}: expected 'colour_object' parts joined by '+'")
            parts.append((colour, obj))
        return tuple(parts)
    if len(compound) == 2 and all(isinstance(s, str) for s in compound):
        return ((compound[0], compound[1]),)
    return tuple((str(c), str(o)) for c, o in compound)


def compositional_matrix(visual: Any, textual: Any, compounds: Sequence, center: bool = False) -> np.ndarray:
    """(K, K) cosine matrix over K compounds: visual (K, D) or (K, N, D), textual likewise.

    Same as ``similarity.concept_matrix``; checks that there is one compound name per row.
    """
    m = concept_matrix(visual, textual, center=center)
    if m.shape[0] != len(compounds):
        raise ValueError(f"{len(compounds)} compound names for a {m.shape} matrix")
    return m


def _summary(margins: list[float]) -> dict:
    if not margins:
        return {"fraction": None, "mean_margin": None, "n_comparisons": 0, "n_wins": 0, "n_ties": 0}
    arr = np.asarray(margins)
    wins, ties = int((arr > 0).sum()), int((arr == 0).sum())
    return {
        "fraction": float((wins + 0.5 * ties) / arr.size),
        "mean_margin": float(arr.mean()),
        "n_comparisons": int(arr.size),
        "n_wins": wins,
        "n_ties": ties,
    }


def canonical_compound(compound: str) -> str:
    """One name per scene content: the parts of a string compound sorted ("red_circle+blue_star" and
    "blue_star+red_circle" name the same two objects, listed in different orders by where they were drawn)."""
    return "+".join(sorted(f"{colour}_{obj}" for colour, obj in parse_compound(compound)))


def binding_score(matrix: Any, compounds: Sequence) -> dict:
    """Attribute, object and swap binding scores of a compositional matrix.

    matrix: (K, K), rows = images of compound i, columns = text of compound j; compounds: K names (see
    ``parse_compound``). Returns dict with blocks ``attribute``, ``object``, ``swap`` (text -> image) and
    ``attribute_image_to_text``, ``object_image_to_text``, ``swap_image_to_text``, each
    dict(fraction, mean_margin, n_comparisons, n_wins, n_ties) (fraction/mean_margin None when the
    compound set has no such pair), plus ``tie_rule`` and ``n_compounds``.
    """
    m = to_numpy(matrix)
    k = len(compounds)
    if m.shape != (k, k):
        raise ValueError(f"matrix shape {m.shape} does not match {k} compounds")
    parsed = [parse_compound(c) for c in compounds]
    keys = [frozenset(p) for p in parsed]  # "a+b" and "b+a" are the same scene
    if len(set(keys)) != k:
        raise ValueError("duplicate compounds")

    pairs: dict[str, list[tuple[int, int]]] = {"attribute": [], "object": [], "swap": []}
    index = {key: i for i, key in enumerate(keys)}
    for j, parts in enumerate(parsed):
        if len(parts) == 1:
            (colour, obj) = parts[0]
            for i, other in enumerate(parsed):
                if len(other) != 1 or i == j:
                    continue
                other_colour, other_obj = other[0]
                if other_obj == obj and other_colour != colour:
                    pairs["attribute"].append((j, i))
                elif other_colour == colour and other_obj != obj:
                    pairs["object"].append((j, i))
        elif len(parts) == 2:
            (c1, o1), (c2, o2) = parts
            if c1 != c2 and o1 != o2:
                swapped = index.get(frozenset({(c2, o1), (c1, o2)}))
                if swapped is not None:
                    pairs["swap"].append((j, swapped))

    out: dict[str, Any] = {}
    for name, comparisons in pairs.items():
        # (j, i): j = the matching compound, i = the competitor.
        text_to_image = [m[j, j] - m[i, j] for j, i in comparisons]  # within column j (text of j)
        image_to_text = [m[j, j] - m[j, i] for j, i in comparisons]  # within row j (images of j)
        out[name] = _summary(text_to_image)
        out[f"{name}_image_to_text"] = _summary(image_to_text)
    out["tie_rule"] = "a comparison is won if the matching similarity is strictly larger; a tie counts half"
    out["n_compounds"] = k
    return out


__all__ = ["binding_score", "canonical_compound", "compositional_matrix", "parse_compound"]
