"""Routing mutual information with the modality (analysis/information.py): its bounds, its invariance to the
experts' names, and a shuffle null that separates informative routing from chance."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.information import routing_information, routing_information_report


def _tokens(n_image=100, n_text=300):
    return np.array([True] * n_image + [False] * n_text)


def test_routing_by_modality_is_fully_informative_whatever_the_experts_are_called():
    is_image = _tokens()
    roles = np.where(is_image, 0, 1)
    for choices in (roles, 1 - roles):  # the Stage 2 roles and the swapped ones
        r = routing_information(is_image, choices, 2, n_shuffles=100)
        assert r["normalised"] == pytest.approx(1.0)
        assert r["p_value"] == pytest.approx(1 / 101) and r["null_q95"] < 0.05


def test_collapsed_or_random_routing_carries_no_information():
    is_image = _tokens()
    collapsed = routing_information(is_image, np.zeros(is_image.size, int), 2, n_shuffles=50)
    assert collapsed["normalised"] == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    coin = routing_information(is_image, rng.integers(0, 2, is_image.size), 2, n_shuffles=200)
    assert coin["normalised"] < coin["null_q95"] * 3 and coin["p_value"] > 0.01


def test_partial_routing_is_between_and_matches_the_entropy_definition():
    is_image = _tokens(200, 200)
    rng = np.random.default_rng(1)
    choices = np.where(rng.random(is_image.size) < 0.8, np.where(is_image, 0, 1), np.where(is_image, 1, 0))
    r = routing_information(is_image, choices, 2, n_shuffles=100)
    # I(E; M) = H(E) - H(E | M), computed by hand from the counts
    p = lambda c: c / c.sum()  # noqa: E731
    h = lambda q: -(q[q > 0] * np.log(q[q > 0])).sum()  # noqa: E731
    h_e = h(p(np.bincount(choices, minlength=2)))
    h_e_m = sum(
        (is_image == m).mean() * h(p(np.bincount(choices[is_image == m], minlength=2))) for m in (True, False)
    )
    assert r["mi"] == pytest.approx(h_e - h_e_m)
    assert 0.1 < r["normalised"] < 0.9 and r["p_value"] < 0.05


def test_report_covers_every_layer_and_one_modality_gives_no_number():
    is_image = _tokens(50, 50)
    per_layer = {
        1: {"is_image": is_image, "choices": np.where(is_image, 0, 1)},
        3: {"is_image": is_image, "choices": np.zeros(100, int)},
    }
    report = routing_information_report(per_layer, 2, n_shuffles=20)
    assert set(report["layers"]) == {1, 3}
    assert report["mean_normalised"] == pytest.approx(0.5)
    text_only = routing_information(np.zeros(10, bool), np.zeros(10, int), 2)
    assert text_only["normalised"] is None
