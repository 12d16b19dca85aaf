"""Expert load, entropy, collapse and purity on constructed router outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from analysis import expert_load, load_report


def router_outputs(t_image=6, t_text=10, collapse_to=None, seed=0):
    """Top-1 choices, (T, 2) probabilities and the image mask for a hard-routed or collapsed layer."""
    is_image = np.array([True] * t_image + [False] * t_text)
    if collapse_to is None:
        choices = np.where(is_image, 0, 1)
    else:
        choices = np.full(is_image.shape, collapse_to)
    probs = np.eye(2)[choices]  # one-hot: the router is certain
    return choices, probs, is_image


def test_forced_collapse():
    choices, probs, is_image = router_outputs(collapse_to=1)
    r = expert_load(choices, probs, is_image)
    assert r["collapsed"] and r["dominant_expert"] == 1 and r["dominant_fraction"] == 1.0
    for modality in ("image", "text", "all"):
        assert r[modality]["dispatch"] == [0.0, 1.0]
        assert r[modality]["routing_entropy"] == 0.0
        assert r[modality]["load_entropy"] == 0.0
    assert r["purity"]["image_on_vision_expert"] == 0.0
    assert r["purity"]["text_on_text_expert"] == 1.0
    assert r["purity"]["overall"] == pytest.approx(10 / 16)
    assert r["purity"]["balanced"] == 0.5
    json.dumps(r, allow_nan=False)


def test_modality_split_is_pure_and_not_collapsed():
    choices, probs, is_image = router_outputs()
    r = expert_load(torch.tensor(choices), torch.tensor(probs), torch.tensor(is_image))
    assert not r["collapsed"]
    assert r["purity"]["image_on_vision_expert"] == 1.0 and r["purity"]["text_on_text_expert"] == 1.0
    assert r["image"]["dispatch"] == [1.0, 0.0] and r["text"]["dispatch"] == [0.0, 1.0]
    assert r["all"]["counts"] == [6, 10]
    # A swapped mapping flips the purity.
    swapped = expert_load(choices, probs, is_image, modality_to_expert={"image": 1, "text": 0})
    assert swapped["purity"]["overall"] == 0.0


def test_balanced_routing_has_entropy_ln2():
    t = 8
    probs = np.full((t, 2), 0.5)
    choices = np.array([0, 1] * (t // 2))
    r = expert_load(choices, probs, np.array([True, False] * (t // 2)))
    assert r["all"]["routing_entropy"] == pytest.approx(np.log(2))
    assert r["all"]["load_entropy"] == pytest.approx(np.log(2))
    assert r["max_entropy"] == pytest.approx(np.log(2))


def test_loads_sum_to_one_per_modality_and_entropy_bounded():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    r = expert_load(probs.argmax(1), probs, rng.random(50) < 0.3)
    for modality in ("image", "text", "all"):
        assert sum(r[modality]["dispatch"]) == pytest.approx(1.0)
        assert sum(r[modality]["soft_mass"]) == pytest.approx(1.0)
        assert 0.0 <= r[modality]["routing_entropy"] <= np.log(4)
    assert r["image"]["n_tokens"] + r["text"]["n_tokens"] == r["all"]["n_tokens"] == 50


def test_edge_cases_and_errors():
    # Hard routing: no probabilities; a text-only probe: image stats are None (null), not NaN.
    r = expert_load(np.array([1, 1, 0]), None, np.zeros(3, dtype=bool), num_experts=2)
    assert r["image"]["dispatch"] is None and r["all"]["soft_mass"] is None
    assert r["purity"]["image_on_vision_expert"] is None
    json.dumps(r, allow_nan=False)
    with pytest.raises(ValueError, match="sum to 1"):
        expert_load(np.array([0, 1]), np.array([[2.0, 1.0], [0.0, 3.0]]), np.array([True, False]))
    with pytest.raises(ValueError, match="top-1"):
        expert_load(np.zeros((3, 2), dtype=int))


def test_load_report_counts_collapsed_layers():
    per_layer = {
        0: dict(zip(("choices", "probs", "is_image"), router_outputs(collapse_to=0), strict=True)),
        1: router_outputs(),
        2: dict(zip(("choices", "probs", "is_image"), router_outputs(collapse_to=1), strict=True)),
    }
    report = load_report(per_layer)
    assert report["n_collapsed"] == 2 and report["collapsed_layers"] == [0, 2]
    assert list(report["layers"]) == ["0", "1", "2"]
    assert json.loads(json.dumps(report, allow_nan=False)) == report


@pytest.mark.parametrize("dominant, collapsed", [(99, True), (98, False)])
def test_hard_collapse_at_exactly_the_threshold(dominant, collapsed):
    """Hard collapse is ">= 99 %" of top-1 dispatch: 99 of 100 tokens on one expert (0.99, exactly the float of
    HARD_COLLAPSE_THRESHOLD) is collapsed, 98 is not. Every other test collapses 100 %, which `>` also passes."""
    from analysis.load import HARD_COLLAPSE_THRESHOLD

    choices = np.array([1] * dominant + [0] * (100 - dominant))
    r = expert_load(choices, num_experts=2)
    assert r["dominant_fraction"] == dominant / 100
    assert (r["dominant_fraction"] == HARD_COLLAPSE_THRESHOLD) is collapsed
    assert r["collapsed"] is collapsed and r["dominant_expert"] == 1
    assert load_report({0: {"choices": choices}}, num_experts=2)["collapsed_layers"] == (
        [0] if collapsed else []
    )


@pytest.mark.parametrize("share, collapsed", [(0.9, True), (np.nextafter(0.9, 0.0), False)])
def test_soft_collapse_at_exactly_the_threshold(share, collapsed):
    """Soft collapse is mean router probability ">= 90 %". Two tokens at p = 0.9 average to exactly the float
    SOFT_COLLAPSE_THRESHOLD (0.9 + 0.9 and the halving are exact), so the boundary itself is tested; the next
    float below is not collapsed. Both tokens' top-1 is expert 0, so the hard definition is collapsed either way."""
    from analysis.load import SOFT_COLLAPSE_THRESHOLD

    probs = np.array([[share, 1.0 - share]] * 2)
    r = expert_load(np.zeros(2, dtype=np.int64), probs)
    assert r["soft_dominant_fraction"] == share
    assert (r["soft_dominant_fraction"] == SOFT_COLLAPSE_THRESHOLD) is collapsed
    assert r["collapsed_soft"] is collapsed and r["soft_dominant_expert"] == 0
    assert r["collapsed"]
