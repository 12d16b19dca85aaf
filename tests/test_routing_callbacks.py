"""The routing callbacks' own rules, without training (tests/test_routing_dynamics.py runs them in real stages):
what a resumed run keeps of its per-step log, where the log is written, and which Gumbel temperatures are refused."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from trainer.callbacks import GumbelTauCallback, ProbeChoicesCallback, RoutingStatsCallback, _keep_lines_up_to
from trainer.routing_stats import flatten, read_log_lines


def _log(path, steps):
    path.write_text("".join(json.dumps({"step": s, "layers": {}}) + "\n" for s in steps))


@pytest.mark.parametrize(
    ("resume_step", "kept"),
    [(0, []), (1, [0, 1]), (2, [0, 1, 2])],
    ids=["fresh-run", "checkpoint-1", "checkpoint-2"],
)
def test_a_run_keeps_the_log_lines_up_to_its_checkpoint(tmp_path, resume_step, kept):
    """Step 0 is a fresh run into a used output_dir: the old lines go (else step 0 would be logged twice); a run
    resumed from checkpoint-N keeps lines 0..N, including N = 1."""
    log = tmp_path / "routing_stats.jsonl"
    _log(log, [0, 1, 2, 3])
    _keep_lines_up_to(log, resume_step)
    assert [r["step"] for r in read_log_lines(log)] == kept


def test_the_routing_log_is_written_under_an_output_dir_not_made_yet(tmp_path):
    out = tmp_path / "runs" / "stage2"  # neither folder exists
    callback = RoutingStatsCallback("2")
    stats = {"dispatch": [0.25, 0.75], "prob": [0.3, 0.7], "entropy": 0.5, "tokens": 8}
    logs = {"loss": 1.0, **flatten({"0": {"image": stats}})}
    args, state = (
        SimpleNamespace(output_dir=str(out)),
        SimpleNamespace(global_step=3, is_world_process_zero=True),
    )
    callback.on_log(args, state, None, logs=logs)
    (record,) = read_log_lines(out / "routing_stats.jsonl")
    assert record["step"] == 3 and record["stage"] == "2"
    assert record["layers"]["0"]["image"]["dispatch"] == [0.25, 0.75]


def test_only_the_main_process_writes_and_only_a_log_with_routing_keys(tmp_path):
    callback = RoutingStatsCallback("2")
    logs = {
        "loss": 1.0,
        **flatten({"0": {"text": {"dispatch": [1.0, 0.0], "prob": [0.6, 0.4], "tokens": 4}}}),
    }
    args = SimpleNamespace(output_dir=str(tmp_path))
    callback.on_log(args, SimpleNamespace(global_step=1, is_world_process_zero=False), None, logs=logs)
    for empty in (None, {}, {"loss": 1.0}):  # an eval log, or none: nothing to record
        callback.on_log(args, SimpleNamespace(global_step=1, is_world_process_zero=True), None, logs=empty)
    assert not (tmp_path / "routing_stats.jsonl").exists()


def test_the_probe_choices_are_written_under_an_output_dir_not_made_yet(tmp_path):
    out = tmp_path / "runs" / "stage3"
    choices = {"layers": {"0": [1, 0]}, "is_image": [True, False]}
    probe = SimpleNamespace(take_choices=lambda: choices)
    callback = ProbeChoicesCallback("3", probe, run_probe=lambda: None)
    args = SimpleNamespace(output_dir=str(out))
    callback._write(args, SimpleNamespace(global_step=0, is_world_process_zero=True))
    assert read_log_lines(out / "routing_probe_choices.jsonl") == [{"step": 0, "stage": "3", **choices}]


@pytest.mark.parametrize(("start", "end"), [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0), (1.0, -0.5)])
def test_gumbel_temperatures_must_be_positive(start, end):
    with pytest.raises(ValueError, match="Gumbel temperatures must be > 0"):
        GumbelTauCallback(start, end)


def test_a_small_positive_gumbel_temperature_is_accepted_and_annealed():
    schedule = GumbelTauCallback(0.5, 0.1)
    assert schedule.tau_at(0, 5) == 0.5 and schedule.tau_at(4, 5) == pytest.approx(0.1)
    assert schedule.tau_at(2, 5) == pytest.approx(0.3)
    assert schedule.tau_at(9, 5) == pytest.approx(0.1)  # past the last step it stays at the end value
    assert schedule.tau_at(1, 2) == pytest.approx(0.1)  # a two-step run ends at the end value
    assert schedule.tau_at(0, 1) == 0.5  # a one-step run starts (and stays) at the start value
