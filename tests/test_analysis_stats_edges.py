"""Edges of the statistics (`analysis.stats`) that `make mutation` found untested: the smallest valid inputs,
the refused ones, and where the percentile interval sits."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.stats import binomial_diagonal_test, bootstrap_ci, proportion_test, silhouette_interval


def test_the_smallest_square_matrix_is_tested_and_anything_else_refused():
    result = binomial_diagonal_test(np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert (result["k"], result["n"], result["null_p"]) == (2, 2, 0.5)
    for bad in (np.ones((1, 1)), np.ones((2, 3)), np.ones((3, 2)), np.ones((2, 2, 2)), np.ones(4)):
        with pytest.raises(ValueError, match="square"):
            binomial_diagonal_test(bad)


def _samples(seed: int = 0):
    rng = np.random.default_rng(seed)
    concepts = rng.normal(size=(4, 1, 16))
    visual = concepts + 0.8 * rng.normal(size=(4, 6, 16))
    textual = concepts + 0.8 * rng.normal(size=(4, 5, 16))
    return visual, textual


def test_bootstrap_intervals_straddle_the_replicates_and_nest_by_level():
    visual, textual = _samples()
    wide = bootstrap_ci(visual, textual, n_boot=400, ci=0.95)
    narrow = bootstrap_ci(visual, textual, n_boot=400, ci=0.5)
    for r in (wide, narrow):
        assert r["margin_ci"][0] < r["margin_mean"] < r["margin_ci"][1]
        assert r["k_ci"][0] <= r["k_mean"] <= r["k_ci"][1]
    assert wide["margin_ci"][0] < narrow["margin_ci"][0] < narrow["margin_ci"][1] < wide["margin_ci"][1]
    # a 50 % interval of a roughly normal spread is about 0.674 / 1.96 of the 95 % one
    ratio = np.diff(narrow["margin_ci"])[0] / np.diff(wide["margin_ci"])[0]
    assert 0.25 < ratio < 0.5, ratio


def test_one_bootstrap_replicate_is_enough_and_none_is_refused():
    visual, textual = _samples()
    assert bootstrap_ci(visual, textual, n_boot=1)["n_boot"] == 1
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(visual, textual, n_boot=0)


def test_a_proportion_of_no_trials_says_so_in_every_field():
    assert proportion_test(0, 0, null_p=0.25) == {
        "fraction": None, "n": 0, "successes": 0, "null_p": 0.25, "p_value": None, "alternative": "greater",
        "ci": 0.95, "interval": None, "method": "wilson",
    }  # fmt: skip
    assert proportion_test(3, 4)["fraction"] == 0.75


def test_silhouette_refuses_points_and_labels_that_do_not_pair():
    points = np.random.default_rng(0).normal(size=(6, 3))
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert silhouette_interval(points, labels, n_boot=20)["n_points"] == 6
    for bad_points, bad_labels in ((points, labels[:5]), (points[:, 0], labels), (points, labels[:, None])):
        with pytest.raises(ValueError, match=r"\(M, D\)"):
            silhouette_interval(bad_points, bad_labels, n_boot=20)
