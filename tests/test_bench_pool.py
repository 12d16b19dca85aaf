"""`moe-vlm bench --runs N` (benchmarks/pool.py): ratios pooled over runs in fresh processes, with an interval that
holds the run-to-run spread, per item across runs of different group sizes, and a `--runs` that resumes.

Synthetic reports stand in for runs: what is checked is the pooling's arithmetic and bookkeeping, not a speed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.pool import RunFailed, firmly, pool_reports, pooled_markdown, pooled_ratio, run_pooled
from benchmarks.timing import ratio_interval

COMMAND = "moe-vlm bench --preset tiny --sections block"


def _report(
    ratio: float, *, items: int = 100, rounds: int = 25, noise: float = 0.005, seed: int = 0, command=COMMAND
):
    """One run's bench.json: a dense baseline of ~1 ms an item and an MoE case at `ratio` of it, with per-round
    noise, in groups of `items` items."""
    rng = np.random.default_rng(seed)
    base = 1e-3 * items * (1 + noise * rng.standard_normal(rounds))
    case = base * ratio * (1 + noise * rng.standard_normal(rounds))
    section = {
        "title": "MoE block vs dense MLP",
        "cases": {
            "dense MLP": {"times_s": base.tolist(), "items": items},
            "MoE block": {"times_s": case.tolist(), "items": items},
        },
        "comparisons": [
            {
                "case": "MoE block",
                "baseline": "dense MLP",
                "kind": "time",
                "target": ["<=", 1.10],
                "value": float(np.median(case) / np.median(base)),
            }
        ],
    }
    return {
        "command": command,
        "machine": {"cpu": "test CPU", "date": f"2026-12-07 run {seed}"},
        "presets": {"tiny": {"description": "tiny", "sections": [section]}},
    }


def _pairs(reports):
    cases = [r["presets"]["tiny"]["sections"][0]["cases"] for r in reports]
    return [
        (
            [t / c["dense MLP"]["items"] for t in c["MoE block"]["times_s"]],
            [t / c["dense MLP"]["items"] for t in c["dense MLP"]["times_s"]],
        )
        for c in cases
    ]


def test_the_pooled_interval_holds_the_spread_between_runs_that_each_runs_interval_misses():
    """Six runs whose ratios sit at 1.06-1.16, each firmly known within its run: one run's interval, or a bootstrap
    of all rounds as if from one run, is narrow; the pooled one holds the runs' spread and leaves 1.10 undecided."""
    reports = [_report(r, seed=i) for i, r in enumerate([1.06, 1.08, 1.10, 1.12, 1.14, 1.16])]
    pairs = _pairs(reports)
    for case, base in pairs:
        low, high = ratio_interval(case, base)
        assert high - low < 0.02
    flat_low, flat_high = ratio_interval(sum((c for c, _ in pairs), []), sum((b for _, b in pairs), []))
    value, (low, high) = pooled_ratio(pairs)
    assert 1.06 < value < 1.16 and low <= value <= high
    assert high - low > 2 * (flat_high - flat_low)  # the runs' spread, not only the rounds'
    assert low < 1.10 < high and firmly((low, high), ["<=", 1.10]) is None
    pooled = pool_reports(reports)
    (comp,) = pooled["presets"]["tiny"]["sections"][0]["comparisons"]
    assert comp["runs"] == 6 and comp["firmly"] is None
    assert comp["run_values"] == [
        r["presets"]["tiny"]["sections"][0]["comparisons"][0]["value"] for r in reports
    ]
    assert "on the line" in pooled_markdown(pooled)


def test_runs_with_different_group_sizes_pool_per_item_and_agreeing_runs_settle_the_verdict():
    """Runs calibrate their group sizes apart: a run timed in groups of 200 items must pool with one of 100 as the
    same speed, so runs that agree at 1.05 give 1.05, firmly under 1.10."""
    reports = [
        _report(1.05, items=100, seed=1),
        _report(1.05, items=200, seed=2),
        _report(1.05, items=150, seed=3),
    ]
    value, interval = pooled_ratio(_pairs(reports))
    assert value == pytest.approx(1.05, abs=0.005) and interval[1] - interval[0] < 0.02
    (comp,) = pool_reports(reports)["presets"]["tiny"]["sections"][0]["comparisons"]
    # the samples pooled are the per-item ones
    assert (comp["value"], comp["interval"]) == (value, list(interval))
    assert comp["met"] is True and comp["firmly"] is True
    assert "met, firmly" in pooled_markdown(pool_reports(reports))
    (missed,) = pool_reports([_report(1.2, seed=4), _report(1.22, seed=5)])["presets"]["tiny"]["sections"][0][
        "comparisons"
    ]
    assert missed["met"] is False and missed["firmly"] is False


def test_a_case_timed_over_other_items_than_its_baseline_keeps_the_runs_own_per_call_ratio():
    reports = [_report(1.05, seed=8), _report(1.05, seed=9)]
    for report in reports:  # the case's groups hold twice the baseline's items and take twice as long
        case = report["presets"]["tiny"]["sections"][0]["cases"]["MoE block"]
        case.update(items=2 * case["items"], times_s=[2 * t for t in case["times_s"]])
    (comp,) = pool_reports(reports)["presets"]["tiny"]["sections"][0]["comparisons"]
    assert comp["value"] == pytest.approx(2.1, abs=0.01)


def test_speed_ratios_invert_and_firmly_reads_both_ends():
    pairs = _pairs([_report(2.0, seed=6), _report(2.0, seed=7)])
    value, (low, high) = pooled_ratio(pairs, kind="speed")
    assert value == pytest.approx(0.5, abs=0.01) and low <= value <= high
    assert firmly((0.9, 1.0), ["<=", 1.1]) is True
    assert firmly((1.2, 1.3), ["<=", 1.1]) is False
    assert firmly((1.0, 1.2), ["within", [1.1, 1.3]]) is None
    assert firmly((1.0, 1.2), None) is None


def test_pooling_refuses_what_it_cannot_pool():
    with pytest.raises(ValueError, match="at least 2"):
        pool_reports([_report(1.0)])
    with pytest.raises(ValueError, match="different commands"):
        pool_reports([_report(1.0), _report(1.0, command="moe-vlm bench --quick")])
    with pytest.raises(ValueError, match="at least 2"):
        pooled_ratio([([1.0], [1.0])])


def test_runs_go_to_fresh_processes_and_a_rerun_resumes(tmp_path):
    """Each run is a child with the parent's arguments and its own --out; a rerun reuses finished runs of the same
    command and runs again one that is missing, cut off, or of another command."""
    calls = []

    def child(argv):
        calls.append(argv)
        out = argv[argv.index("--out") + 1]
        k = int(out.rsplit("-", 1)[1])
        (tmp_path / f"run-{k}").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"run-{k}" / "bench.json").write_text(json.dumps(_report(1.0 + 0.01 * k, seed=k)))
        return 0

    argv = ["--preset", "tiny", "--sections", "block"]
    pooled = run_pooled(3, tmp_path, argv, COMMAND, child, log=lambda line: None)
    assert [c[: len(argv)] for c in calls] == [argv] * 3
    assert [c[-1] for c in calls] == [str(tmp_path / f"run-{k}") for k in (1, 2, 3)]
    assert pooled["runs"] == 3 and json.loads((tmp_path / "bench-pooled.json").read_text()) == pooled
    assert "MoE block" in (tmp_path / "bench-pooled.md").read_text()
    calls.clear()
    run_pooled(3, tmp_path, argv, COMMAND, child, log=lambda line: None)
    assert calls == []
    (tmp_path / "run-2" / "bench.json").write_text('{"command": "moe-')  # cut off while writing
    (tmp_path / "run-3" / "bench.json").write_text(json.dumps(_report(1.0, command="moe-vlm bench --quick")))
    run_pooled(4, tmp_path, argv, COMMAND, child, log=lambda line: None)
    assert [c[-1] for c in calls] == [str(tmp_path / f"run-{k}") for k in (2, 3, 4)]


def test_a_failed_run_stops_the_pool_with_a_one_line_error(tmp_path, capsys):
    with pytest.raises(RunFailed, match="run 1 of 2 exited with status 3"):
        run_pooled(2, tmp_path, [], COMMAND, lambda argv: 3, log=lambda line: None)
    import moe_vlm_cli

    assert moe_vlm_cli.main(["bench", "--runs", "0"]) == 2
    assert "--runs must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 2"):
        run_pooled(1, tmp_path, [], COMMAND, lambda argv: 0)
