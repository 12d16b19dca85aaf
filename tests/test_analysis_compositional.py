"""Binding scores on compositional matrices where the answer is known by construction."""

from __future__ import annotations

import json

import numpy as np
import pytest

from analysis import binding_score, compositional_matrix, parse_compound

COLOURS = ["red", "green", "blue"]
OBJECTS = ["circle", "square"]
SINGLES = [f"{c}_{o}" for o in OBJECTS for c in COLOURS]  # grouped by object


def structured_matrix(compounds, same_compound, same_object, same_colour=0.0, noise=0.0, seed=0):
    """Similarity = sum of bonuses for sharing the compound / the object / the colour (+ noise)."""
    parts = [parse_compound(c) for c in compounds]
    k = len(compounds)
    m = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            objs_i, objs_j = {o for _, o in parts[i]}, {o for _, o in parts[j]}
            cols_i, cols_j = {c for c, _ in parts[i]}, {c for c, _ in parts[j]}
            m[i, j] = (
                same_compound * (i == j) + same_object * (objs_i == objs_j) + same_colour * (cols_i == cols_j)
            )
    return m + noise * np.random.default_rng(seed).normal(size=(k, k))


def test_parse_compound():
    assert parse_compound("red_circle") == (("red", "circle"),)
    assert parse_compound("red_circle+blue_square") == (("red", "circle"), ("blue", "square"))
    assert parse_compound("red_traffic_light") == (("red", "traffic_light"),)
    assert parse_compound(("light_blue", "car")) == (("light_blue", "car"),)
    with pytest.raises(ValueError):
        parse_compound("circle")


def test_colour_bound_gives_one():
    m = structured_matrix(SINGLES, same_compound=1.0, same_object=0.5)
    result = binding_score(m, SINGLES)
    assert result["attribute"]["fraction"] == 1.0
    assert result["attribute"]["n_comparisons"] == 6 * 2  # each compound vs the 2 other colours
    assert result["attribute"]["mean_margin"] == pytest.approx(1.0)
    assert result["object"]["fraction"] == 1.0
    assert result["swap"]["fraction"] is None  # no scenes in this set
    json.dumps(result, allow_nan=False)


def test_colour_ignored_gives_one_half():
    # Object dominance: images of any colour of the object are equally close -> all ties -> 0.5.
    m = structured_matrix(SINGLES, same_compound=0.0, same_object=1.0)
    result = binding_score(m, SINGLES)
    assert result["attribute"]["fraction"] == 0.5 and result["attribute"]["n_ties"] == 12
    assert result["object"]["fraction"] == 1.0  # objects are still told apart
    noisy = binding_score(structured_matrix(SINGLES * 1, 0.0, 1.0, noise=0.05, seed=1), SINGLES)
    assert 0.2 <= noisy["attribute"]["fraction"] <= 0.8


def test_swap_pairs():
    scenes = ["red_circle+blue_square", "blue_circle+red_square", "green_circle+red_square"]
    bound = binding_score(structured_matrix(scenes, same_compound=1.0, same_object=0.5), scenes)
    assert bound["swap"]["n_comparisons"] == 2  # only the first two are swaps of each other
    assert bound["swap"]["fraction"] == 1.0
    bag_of_words = binding_score(structured_matrix(scenes, 0.0, 1.0, same_colour=1.0), scenes)
    assert bag_of_words["swap"]["fraction"] == 0.5
    assert bound["swap_image_to_text"]["fraction"] == 1.0


def test_compositional_matrix_checks_names():
    rng = np.random.default_rng(0)
    v, t = rng.normal(size=(6, 4, 8)), rng.normal(size=(6, 4, 8))
    assert compositional_matrix(v, t, SINGLES).shape == (6, 6)
    with pytest.raises(ValueError, match="compound names"):
        compositional_matrix(v, t, SINGLES[:5])


def test_a_compound_listed_in_either_order_is_one_compound():
    """Shapes seed 1 holds "x+y" and "y+x" scenes: the analysis pools them instead of refusing duplicates."""
    import numpy as np

    from analysis.compositional import canonical_compound
    from analysis.run import compositional_analysis

    assert canonical_compound("red_circle+blue_star") == canonical_compound("blue_star+red_circle")
    assert canonical_compound("red_circle") == "red_circle"
    records = [
        {"compound": "red_circle+blue_star"},
        {"compound": "blue_star+red_circle"},
        {"compound": "blue_circle+red_star"},
        {"compound": "red_circle"},
    ]
    rng = np.random.default_rng(0)
    states = {key: {1: rng.normal(size=(4, 6))} for key in ("visual", "textual")}
    names, out = compositional_analysis(states, records, [0])
    assert names == ["blue_circle+red_star", "blue_star+red_circle", "red_circle"]
    visual, textual = states["visual"][1][:2].mean(0), states["textual"][1][:2].mean(0)  # the pooled pair
    matrix = np.asarray(out[0]["matrix"])
    assert matrix.shape == (3, 3) and out[0]["binding"]["swap"]["n_comparisons"] == 2
    cosine = visual @ textual / (np.linalg.norm(visual) * np.linalg.norm(textual))
    assert np.isclose(matrix[1, 1], cosine)
