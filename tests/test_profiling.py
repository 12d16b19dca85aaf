"""`moe-vlm train --profile`: the per-step time split adds up to the step, every step is credited with the analytic
FLOPs of the batch it trained on, and the report names the measured matmul rate it divides by."""

from __future__ import annotations

import json
import time

import pytest
from training_helpers import make_shapes, make_stage0, quick_args, train
from transformers import TrainerCallback

from trainer.profiling import PHASES, PROFILE_FILE, StepProfiler, markdown_table, summarise


class WallClock(TrainerCallback):
    """Step ends by the wall clock, independently of the profiler."""

    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    work = tmp_path_factory.mktemp("profile")
    shapes, stage0 = make_shapes(work / "shapes"), make_stage0(work / "stage0")
    profiler, clock = StepProfiler(warmup=1, rate_size=256), WallClock()
    # logging every 2 steps: the routing probe and statistics run in the bookkeeping of steps 2, 4, 6
    out = train("2", work / "stage2", stage0, quick_args(shapes, steps=6), callbacks=[profiler, clock])
    return profiler, clock, out


def test_phases_add_up_to_the_wall_time_between_steps(profiled):
    profiler, clock, _ = profiled
    (run,) = profiler.runs
    steps = run["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    for before, step, after_end in zip(clock.ends, steps[1:], clock.ends[1:]):
        # From one step's end to the next: this step's bookkeeping belongs to the previous one, so compare the
        # phases of a step with the gap between the two step ends minus the previous step's bookkeeping.
        measured = after_end - before
        phases = sum(step[p] for p in PHASES if p != "bookkeeping")
        assert phases <= measured + 1e-3
        assert phases >= 0.8 * (measured - steps[step["step"] - 2]["bookkeeping"]) - 1e-3
    assert all(s["forward"] > 0 and s["backward"] > 0 and s["optimizer"] > 0 for s in steps)


def test_the_probe_runs_in_the_bookkeeping_not_in_the_forward(profiled):
    profiler, _, _ = profiled
    steps = profiler.runs[0]["steps"]
    logged = [s["bookkeeping"] for s in steps if s["step"] % 2 == 0]
    quiet = [s["bookkeeping"] for s in steps if s["step"] % 2 == 1]
    assert min(logged) > max(quiet)


def test_every_step_has_its_batchs_analytic_flops(profiled):
    profiler, _, _ = profiled
    run = profiler.runs[0]
    assert run["flops_counted_by"].startswith("trainer.flops")
    flops = [s["flops"] for s in run["steps"]]
    assert all(f > 0 for f in flops)
    assert len(set(flops)) > 1  # the batches differ in length: the count follows the batch, not a constant


def test_summary_and_table_divide_by_the_measured_rate(profiled, tmp_path):
    profiler, _, _ = profiled
    run = profiler.runs[0]
    summary = run["summary"]
    assert summary["steps"] == 5  # the warm-up step is left out
    assert summary["utilisation"] == pytest.approx(
        summary["flops_per_step"] / summary["step_s"] / run["matmul_rate_flops"]
    )
    table = markdown_table(profiler.runs)
    assert "| stage2 | 4 |" in table and "GFLOP/s" in table and "matmul rate measured" in table
    onednn = run["onednn_matmul_rate_flops"]  # None only where this torch has no oneDNN
    if onednn:
        assert f"through oneDNN: {onednn / 1e9:.1f} GFLOP/s" in table
        assert f"torch's rate is {run['matmul_rate_flops'] / onednn:.0%} of it" in table
    else:
        assert "oneDNN" not in table
    saved = json.loads(profiler.write(tmp_path / PROFILE_FILE).read_text())
    assert saved["runs"][0]["summary"] == summary


def test_summarise_on_made_up_steps():
    steps = [
        {"data": 0.1, "forward": 0.2, "backward": 0.3, "optimizer": 0.1, "bookkeeping": 0.3, "flops": 1e9},
        {"data": 0.1, "forward": 0.2, "backward": 0.3, "optimizer": 0.1, "bookkeeping": 0.3, "flops": 1e9},
    ]
    summary = summarise(steps, rate=1e10)
    assert summary["step_s"] == pytest.approx(1.0)
    assert summary["gflops_per_s"] == pytest.approx(1.0)
    assert summary["compute_utilisation"] == pytest.approx(1e9 / 0.6 / 1e10)
