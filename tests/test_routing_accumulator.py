"""The routing statistics' arithmetic (`trainer.routing_stats`), by hand-computed cases: what the accumulator sums
and averages, and how a per-step log is read back (blank lines, a torn last line, damage before it)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from trainer.routing_stats import RoutingAccumulator, read_log_lines


def test_soft_load_is_the_mean_router_probability_over_several_batches():
    acc = RoutingAccumulator([0], 2)
    a = torch.tensor([[0.0, 0.0], [2.0, 0.0]])  # probabilities (0.5, 0.5) and (0.881, 0.119)
    b = torch.tensor([[0.0, 1.0]])  # (0.269, 0.731)
    acc.update([a], [torch.tensor([[0], [0]])], torch.zeros(1, 2, dtype=torch.bool), None)
    acc.update([b], [torch.tensor([[1]])], torch.zeros(1, 1, dtype=torch.bool), None)
    assert acc.n_tokens == 3.0
    text = acc.summary()["0"]["text"]
    expected = torch.cat([a, b]).softmax(-1).mean(0).tolist()
    assert text["prob"] == pytest.approx(expected) and text["tokens"] == 3
    assert text["dispatch"] == pytest.approx([2 / 3, 1 / 3])


def test_a_text_only_batch_still_counts_its_text_and_all_groups():
    """No image token: the image group is left out, and the groups after it are still summed."""
    acc = RoutingAccumulator([0], 2)
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    acc.update([logits], [torch.tensor([[0], [1]])], torch.zeros(1, 2, dtype=torch.bool), torch.ones(1, 2))
    summary = acc.summary()["0"]
    assert set(summary) == {"text", "all"}
    assert summary["text"]["tokens"] == summary["all"]["tokens"] == 2


def test_tokens_are_counted_not_the_agreement_beside_them():
    """`n_tokens` is the valid-token count, even where the dispatched expert is not the argmax (agreement < 1);
    padding is not counted."""
    acc = RoutingAccumulator([0, 1], 2)
    logits = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    index = torch.tensor([[1], [1], [1], [0]])  # two of the three valid tokens go against the argmax
    attention = torch.tensor([[1, 1, 1, 0]])
    acc.update([logits, logits], [index, index], torch.zeros(1, 4, dtype=torch.bool), attention)
    assert acc.n_tokens == 3.0
    assert acc.summary()["1"]["all"]["agreement"] == pytest.approx(1 / 3)


def test_one_expert_has_no_logit_gap_and_logs_zero():
    acc = RoutingAccumulator([0], 1)
    acc.update(
        [torch.tensor([[0.3], [1.2]])], [torch.tensor([[0], [0]])], torch.zeros(1, 2, dtype=torch.bool), None
    )
    text = acc.summary()["0"]["text"]
    assert text["logit_gap"] == 0.0 and text["logit_margin"] == 0.0 and text["dispatch"] == [1.0]


def _lines(path, *lines):
    path.write_text("\n".join(lines) + "\n")


def test_a_blank_line_is_skipped_and_the_records_after_it_are_read(tmp_path):
    log = tmp_path / "routing_stats.jsonl"
    _lines(log, json.dumps({"step": 1}), "", json.dumps({"step": 2}))
    assert read_log_lines(log) == [{"step": 1}, {"step": 2}]


def test_only_the_last_line_may_be_torn_and_each_case_names_its_line(tmp_path, caplog):
    log = tmp_path / "routing_stats.jsonl"
    _lines(log, json.dumps({"step": 1}), json.dumps({"step": 2}), '{"step": 3, "lay')
    with caplog.at_level(logging.WARNING):
        assert read_log_lines(log) == [{"step": 1}, {"step": 2}]
    assert "torn last line 3" in caplog.text
    _lines(log, json.dumps({"step": 1}), '{"step": 2,', json.dumps({"step": 3}))
    with pytest.raises(ValueError, match=r"routing_stats.jsonl, line 2: not a JSON record"):
        read_log_lines(log)


def test_the_sums_have_the_documented_layout_for_one_all_reduce():
    """(layers, groups, 2 E + scalars + 1): every process must build the same tensor to sum it across processes."""
    from configuration.contract import LOAD_GROUPS
    from trainer.routing_stats import SCALAR_STATS

    acc = RoutingAccumulator([0, 2, 3], 4)
    assert tuple(acc.sums.shape) == (3, len(LOAD_GROUPS), 2 * 4 + len(SCALAR_STATS) + 1)
    assert RoutingAccumulator([], 2).n_tokens == 0.0  # no MoE layer: no token routed


def test_with_top2_routing_the_dispatch_counts_each_tokens_first_choice():
    acc = RoutingAccumulator([0], 3)
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    index = torch.tensor([[0, 1], [1, 2]])  # (tokens, k): the first column is the top-1 expert
    acc.update([logits], [index], torch.zeros(1, 2, dtype=torch.bool), None)
    assert acc.summary()["0"]["text"]["dispatch"] == [0.5, 0.5, 0.0]


def test_a_modality_with_a_single_token_is_reported():
    acc = RoutingAccumulator([0], 2)
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    mask = torch.tensor([[True, False, False]])  # one image token
    acc.update([logits], [torch.tensor([[0], [1], [1]])], mask, None)
    image = acc.summary()["0"]["image"]
    assert image["tokens"] == 1 and image["dispatch"] == [1.0, 0.0]
