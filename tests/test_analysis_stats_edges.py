"""Edges of the statistics (`analysis.stats`) that `make mutation` found untested: the smallest valid inputs,
the refused ones, and where the percentile interval sits."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.stats import (
    binomial_diagonal_test,
    bootstrap_ci,
    diagonal_tests,
    permutation_test,
    proportion_test,
    silhouette_interval,
)


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


def test_every_open_interval_and_minimum_is_enforced_at_its_boundary():
    visual, textual = _samples()
    m = np.eye(3)
    assert binomial_diagonal_test(m, null_p=1e-9)["null_p"] == 1e-9
    for null_p in (0.0, 1.0):
        with pytest.raises(ValueError, match="null_p"):
            binomial_diagonal_test(m, null_p=null_p)
    assert bootstrap_ci(visual, textual, n_boot=5, ci=1e-9)["ci"] == 1e-9
    for ci in (0.0, 1.0):
        with pytest.raises(ValueError, match="ci must"):
            bootstrap_ci(visual, textual, n_boot=5, ci=ci)
    assert permutation_test(visual, textual, n_permutations=1)["n_permutations"] == 1
    with pytest.raises(ValueError, match="n_permutations"):
        permutation_test(visual, textual, n_permutations=0)
    assert bootstrap_ci(visual[:2], textual[:2], n_boot=5)["n_concepts"] == 2
    with pytest.raises(ValueError, match="at least 2 concepts"):
        bootstrap_ci(visual[:1], textual[:1], n_boot=5)
    assert proportion_test(1, 1)["fraction"] == 1.0


def test_one_sample_per_concept_has_no_bootstrap_spread():
    visual, textual = _samples()
    r = bootstrap_ci(visual[:, :1], textual[:, :1], n_boot=50)
    obs = r["observed_margin"]
    np.testing.assert_allclose([*r["margin_ci"], *r["margin_ci_basic"], r["margin_mean"]], obs, rtol=1e-12)


def test_the_basic_interval_reflects_the_percentile_one_about_the_observed_margin():
    r = bootstrap_ci(*_samples(), n_boot=200)
    low, high = r["margin_ci"]
    np.testing.assert_allclose(
        r["margin_ci_basic"], [2 * r["observed_margin"] - high, 2 * r["observed_margin"] - low]
    )


def test_diagonal_tests_give_k_over_n_with_its_interval():
    rng = np.random.default_rng(3)
    concepts = rng.normal(size=(4, 1, 16))
    noisy = (concepts + 2.0 * rng.normal(size=(4, 6, 16)), concepts + 2.0 * rng.normal(size=(4, 5, 16)))
    r = diagonal_tests(*noisy, center=False, n_permutations=20, n_boot=200)
    low, high = r["bootstrap"]["k_ci"]
    assert 0 < r["k"] and low < high  # an interval that is not one point
    assert r["k_over_n"] == r["k"] / r["n"]
    assert r["k_over_n_ci"] == [low / r["n"], high / r["n"]]


def test_the_documented_defaults():
    """The numbers a call without arguments runs, pinned so a changed default is a decision, not a slip: 1000
    permutations and bootstrap replicates, seed 0, 95 % intervals, chance 0.5 for a share."""
    visual, textual = _samples()
    assert (
        permutation_test(visual, textual)["n_permutations"],
        permutation_test(visual, textual)["seed"],
    ) == (1000, 0)
    boot = bootstrap_ci(visual, textual)
    assert (boot["n_boot"], boot["seed"], boot["ci"]) == (1000, 0, 0.95)
    both = diagonal_tests(visual, textual, center=False)
    assert (both["permutation"]["n_permutations"], both["bootstrap"]["n_boot"], both["bootstrap"]["seed"]) == (
        1000, 1000, 0,
    )  # fmt: skip
    share = proportion_test(6, 10)
    assert (share["null_p"], share["ci"]) == (0.5, 0.95)
    silhouette = silhouette_interval(np.eye(4), [0, 0, 1, 1])
    assert (silhouette["n_boot"], silhouette["seed"], silhouette["ci"]) == (1000, 0, 0.95)


def test_samples_of_the_wrong_rank_or_shapes_are_refused():
    visual, textual = _samples()
    for v, t, message in (
        (visual[:, 0], textual, r"must be \(C, N, D\)"),
        (visual, textual[:, 0], r"must be \(C, N, D\)"),
        (visual[:3], textual, "must share C and D"),
        (visual, textual[..., :8], "must share C and D"),
    ):
        with pytest.raises(ValueError, match=message):
            bootstrap_ci(v, t, n_boot=5)


def test_each_visual_sample_is_drawn_with_equal_chance():
    """Two concepts, two visual samples each: concept 0's mean hits its caption only when both draws are its
    sample 0 (probability 1/4 under uniform resampling); one draw of each ties, which is no hit."""
    e0, e1 = np.eye(2)
    visual = np.stack([np.stack([e0, e1]), np.stack([e1, e1])])  # (C=2, N_v=2, D=2)
    textual = np.stack([e0[None], e1[None]])  # (C=2, N_t=1, D=2)
    r = bootstrap_ci(visual, textual, n_boot=4000, seed=0)
    assert abs(r["hit_rate_per_concept"][0] - 0.25) < 0.03, r["hit_rate_per_concept"]


def test_the_percentile_interval_reads_the_two_tail_quantiles(monkeypatch):
    import analysis.stats as stats

    asked = []
    quantile = stats.np.quantile

    def recording(values, q, *args, **kwargs):
        asked.append(round(float(q), 12))
        return quantile(values, q, *args, **kwargs)

    monkeypatch.setattr(stats.np, "quantile", recording)
    bootstrap_ci(*_samples(), n_boot=50, ci=0.9)
    assert sorted(set(asked)) == [0.05, 0.95]
