"""Edges of the expert-load analysis (`analysis.load`) that `make mutation` found untested: (T, 1) choices,
inferring the number of experts, a probs array of the wrong length, expert 0's probability in the series, and
whether the last log is the one `at_end` reads."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.load import (
    HARD_COLLAPSE_THRESHOLD,
    SOFT_COLLAPSE_THRESHOLD,
    collapse_definitions,
    expert_load,
    routing_dynamics,
)


def test_column_choices_are_the_same_as_flat_ones():
    flat = expert_load(np.array([0, 1, 1, 1]))
    column = expert_load(np.array([[0], [1], [1], [1]]))
    assert column["all"]["counts"] == flat["all"]["counts"] == [1, 3]


def test_the_number_of_experts_is_inferred_from_the_largest_choice_or_one_without_tokens():
    assert expert_load(np.array([0, 2, 2]))["num_experts"] == 3
    assert expert_load(np.array([], dtype=np.int64))["num_experts"] == 1


def test_probs_of_another_length_are_refused():
    with pytest.raises(ValueError, match=r"probs must be \(T, E\)"):
        expert_load(np.array([0, 1, 1]), probs=np.full((2, 2), 0.5))


def _record(step: int, dispatch0: float, prob0: float) -> dict:
    stats = {"dispatch": [dispatch0, 1 - dispatch0], "prob": [prob0, 1 - prob0]}
    return {"step": step, "layers": {"0": {"all": stats}}}


def test_series_carry_expert_0s_share_and_at_end_reads_the_last_log():
    records = [_record(10, 0.5, 0.3), _record(20, 1.0, 0.4), _record(30, 0.5, 0.45)]
    result = routing_dynamics(records)
    series = result["train"]["0"]["all"]
    assert series["dispatch0"] == [0.5, 1.0, 0.5] and series["prob0"] == [0.3, 0.4, 0.45]
    hard = result["collapse"]["train"]["0"]["hard"]
    assert (hard["first_step"], hard["expert"], hard["at_end"], hard["n_collapsed_logs"]) == (20, 0, False, 1)
    ends = routing_dynamics([_record(10, 0.5, 0.3), _record(20, 0.5, 0.3), _record(30, 0.0, 0.3)])
    assert ends["collapse"]["train"]["0"]["hard"]["at_end"] is True
    assert ends["collapse"]["train"]["0"]["hard"]["expert"] == 1


def test_choices_outside_the_experts_and_logits_of_another_shape_are_refused():
    assert expert_load(np.array([0, 1]), num_experts=2)["num_experts"] == 2
    for bad in ([-1, 0], [0, 2]):
        with pytest.raises(ValueError, match="choices"):
            expert_load(np.array(bad), num_experts=2)
    choices, probs = np.array([0, 1, 1]), np.full((3, 2), 0.5)
    assert expert_load(choices, probs=probs, logits=np.zeros((3, 2)))["n_tokens"] == 3
    with pytest.raises(ValueError, match="logits"):
        expert_load(choices, probs=probs, logits=np.zeros((3, 3)))


def test_float_choices_and_probs_that_are_not_probabilities_are_refused():
    with pytest.raises(ValueError, match="integer expert indices"):
        expert_load(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="sum to 1"):
        expert_load(np.array([0, 1]), probs=np.array([[0.9, 0.6], [0.5, 0.5]]))


def test_collapse_definitions_without_a_load_block_use_the_defaults():
    assert (
        collapse_definitions(None)
        == collapse_definitions({})
        == collapse_definitions(
            {
                "collapse_threshold": HARD_COLLAPSE_THRESHOLD,
                "soft_collapse_threshold": SOFT_COLLAPSE_THRESHOLD,
            }
        )
    )
    assert "90%" in collapse_definitions({"collapse_threshold": 0.9})[0]


def test_a_layer_without_all_token_statistics_has_no_collapse_at_the_end():
    records = [{"step": 10, "layers": {"0": {"image": {"dispatch": [1.0, 0.0], "prob": [1.0, 0.0]}}}}]
    onset = routing_dynamics(records)["collapse"]["train"]["0"]["hard"]
    assert onset == {"first_step": None, "expert": None, "at_end": False, "n_collapsed_logs": 0}
