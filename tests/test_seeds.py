"""Several seeds: the aggregation (t intervals, verdicts, invariant counts) on constructed seed reports, the report
across seeds, and `moe-vlm reproduce --seeds` wired step by step with training, analyses and the per-seed report
replaced by recorders (no model is trained). `$MOE_VLM_CACHE` points at a temp folder in every test."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from scipy import stats

from configuration.contract import (
    ANALYSIS_FILE,
    CACHE_ENV,
    CAPTIONING_FILE,
    COMPLETION_MARKER,
    REPORT_HTML,
    REPORT_JSON,
)
from pipeline import pretrain_cache, seeds

T_975_DF2 = 4.302652729911275  # Student t, 97.5th percentile, 2 degrees of freedom (statistical tables)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


def claim(paper, agrees, met=True, measured="m"):
    return {
        "paper": paper,
        "measured": measured if met else f"n/a: precondition ({measured})",
        "agrees": agrees if met else None,
        "precondition": f"precondition of {paper}",
        "precondition_met": met,
    }


def seed_report(seed: int, headline: dict, claims: list[dict], failing: tuple[str, ...] = ()) -> dict:
    names = ("experts identical after upcycling (Stage 0)", "per-layer loads sum to 1", "vision probe")
    return {
        "seed": seed,
        "headline": headline,
        "comparison_with_paper": claims,
        "invariants": [{"name": n, "passed": n not in failing, "detail": ""} for n in names],
    }


# ----- the interval ------------------------------------------------------------------------------------------------
def test_the_interval_is_students_t_on_the_seed_means():
    result = seeds.interval([1.0, 2.0, 4.0])
    mean = 7 / 3
    s = math.sqrt(((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 2)  # sample std, n - 1
    half = T_975_DF2 * s / math.sqrt(3)
    assert result["n"] == 3
    assert result["mean"] == pytest.approx(mean)
    assert result["std"] == pytest.approx(s)
    assert result["low"] == pytest.approx(mean - half) and result["high"] == pytest.approx(mean + half)
    assert result["half_width"] == pytest.approx(half)
    assert half == pytest.approx(3.7946, abs=1e-4)  # worked by hand: 4.3027 * 1.5275 / 1.7321
    assert stats.t.ppf(0.975, 2) == pytest.approx(T_975_DF2)


def test_one_seed_has_no_interval_and_equal_seeds_a_zero_width_one():
    one = seeds.interval([0.7])
    assert one["mean"] == 0.7 and one["low"] is None and one["high"] is None and one["n"] == 1
    same = seeds.interval([0.5, 0.5, 0.5])
    assert same["low"] == same["high"] == 0.5 and same["half_width"] == 0.0
    assert seeds.interval([])["mean"] is None


def test_headline_numbers_are_aggregated_per_key_with_their_seed_values():
    reports = {
        0: seed_report(0, {"cider_stage2": 10.0, "crossover_pct": 5.0, "p_stage2": 0.01}, []),
        1: seed_report(1, {"cider_stage2": 12.0, "crossover_pct": None, "p_stage2": 0.02}, []),
        2: seed_report(2, {"cider_stage2": 17.0, "crossover_pct": float("nan")}, []),
    }
    h = seeds.aggregate_headline(reports)
    assert list(h) == ["cider_stage2", "crossover_pct", "p_stage2"]
    cider = h["cider_stage2"]
    assert cider["per_seed"] == {"0": 10.0, "1": 12.0, "2": 17.0}
    expected = stats.t.interval(0.95, 2, loc=13.0, scale=stats.sem([10.0, 12.0, 17.0]))
    assert (cider["low"], cider["high"]) == pytest.approx(expected)
    assert cider["mean"] == pytest.approx(13.0) and cider["n"] == 3
    # missing / non-finite values are left out of the interval and shown as absent
    assert h["crossover_pct"]["per_seed"] == {"0": 5.0, "1": None, "2": None}
    assert h["crossover_pct"]["n"] == 1 and h["crossover_pct"]["low"] is None
    assert h["p_stage2"]["per_seed"]["2"] is None and h["p_stage2"]["n"] == 2
    assert h["p_stage2"]["low"] < 0.015 < h["p_stage2"]["high"]


# ----- verdicts and invariants ------------------------------------------------------------------------------------
def test_the_overall_verdict_needs_every_seed():
    reports = {
        0: seed_report(0, {}, [claim("A", True), claim("B", True), claim("C", True), claim("D", False)]),
        1: seed_report(
            1, {}, [claim("A", True), claim("B", False), claim("C", True, met=False), claim("D", False)]
        ),
        2: seed_report(2, {}, [claim("A", True), claim("B", True), claim("D", False), claim("E", True)]),
    }
    by = {c["paper"]: c for c in seeds.aggregate_comparisons(reports)}
    assert list(by) == ["A", "B", "C", "D", "E"]
    assert (by["A"]["verdict"], by["A"]["agrees"]) == ("agrees", True)
    assert (by["B"]["verdict"], by["B"]["agrees"]) == ("mixed", False)
    assert by["B"]["seed_counts"] == {"agree": 2, "disagree": 1, "precondition_failed": 0, "missing": 0}
    # a precondition failed in seed 1, and seed 2's report lacks the claim: n/a
    assert (by["C"]["verdict"], by["C"]["agrees"]) == ("n/a", None)
    assert by["C"]["per_seed"]["1"]["precondition_met"] is False and by["C"]["per_seed"]["2"] is None
    assert by["C"]["precondition"] == "precondition of C"
    assert (by["D"]["verdict"], by["D"]["agrees"]) == ("disagrees", False)
    assert (by["E"]["verdict"], by["E"]["agrees"]) == ("n/a", None)


def test_a_report_without_preconditions_counts_judged_claims_as_met():
    old = {"paper": "A", "measured": "x", "agrees": True}
    reports = {0: seed_report(0, {}, [old]), 1: seed_report(1, {}, [dict(old)])}
    (entry,) = seeds.aggregate_comparisons(reports)
    assert entry["verdict"] == "agrees"


def test_invariants_are_counted_per_seed():
    reports = {
        0: seed_report(0, {}, []),
        1: seed_report(1, {}, [], failing=("vision probe",)),
    }
    inv = seeds.aggregate_invariants(reports)
    assert inv["per_seed"] == {"0": {"passed": 3, "total": 3}, "1": {"passed": 2, "total": 3}}
    probe = next(c for c in inv["checks"] if c["name"] == "vision probe")
    assert probe["per_seed"] == {"0": True, "1": False} and probe["passed_seeds"] == 1
    assert seeds.aggregate(reports)["all_invariants_pass"] is False
    assert seeds.aggregate({0: reports[0]})["all_invariants_pass"] is True


def test_the_report_across_seeds_shows_every_seed_value_and_links_each_seed_report(tmp_path):
    reports = {
        s: seed_report(
            s, {"cider_stage2": 10.0 + 1.25 * s}, [claim("Stage 2 aligns", s != 2, measured=f"k={5 + s}/8")]
        )
        for s in (0, 1, 2)
    }
    report = seeds.write_aggregate_report(tmp_path, reports, {"timings_seconds": {"seed0": 1.0}})
    on_disk = json.loads((tmp_path / REPORT_JSON).read_text())
    assert on_disk["headline"]["cider_stage2"]["per_seed"] == {"0": 10.0, "1": 11.25, "2": 12.5}
    assert on_disk["seeds"] == [0, 1, 2] and report["interval"]["confidence"] == 0.95
    page = (tmp_path / REPORT_HTML).read_text()
    for value in ("10", "11.25", "12.5", "11.25"):  # every seed's value and the mean
        assert f"<td>{value}</td>" in page
    h = report["headline"]["cider_stage2"]
    assert f"[{h['low']:.4g}, {h['high']:.4g}]" in page
    for s in (0, 1, 2):
        assert f"href='seed{s}/{REPORT_HTML}'" in page
        assert f"k={5 + s}/8" in page
    assert "mixed" in page and "Student t" in page


# ----- `moe-vlm reproduce` wired with recorders ------------------------------------------------------------------
class Recorder:
    """Stands in for training, the analyses and the per-seed report; fails on the step named in `fail_at`."""

    def __init__(self, fail_at: tuple[str, int | None] | None = None):
        self.calls: list[tuple] = []
        self.fail_at = fail_at

    def train(self, out_dir, stage, source, seed, extra=()):
        self.calls.append(
            ("train", Path(out_dir), stage, None if source is None else Path(source), seed, tuple(extra))
        )
        if self.fail_at == (stage, seed):
            raise KeyboardInterrupt(f"killed in stage {stage}")
        if source is not None:
            assert (Path(source) / COMPLETION_MARKER).is_file(), f"{source} is not finished"
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / COMPLETION_MARKER).write_text(json.dumps({"stage": stage}))

    def analyze(self, model_dir, out_dir, *, init_dir=None, seed=0, n_samples=200, **_):
        self.calls.append(("analyze", Path(model_dir), seed))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / ANALYSIS_FILE).write_text("{}")

    def evaluate(self, model_dir, out_dir, *, seed=0, n_samples=100, **_):
        self.calls.append(("evaluate", Path(model_dir), seed))
        (Path(out_dir) / CAPTIONING_FILE).write_text("{}")

    def write_report(self, run_dir, timings, extra=None):
        seed = extra["seed"]
        report = {
            **seed_report(seed, {"cider_stage2": 10.0 + seed}, [claim("A", True)]),
            "timings_seconds": timings,
            **extra,
        }
        (Path(run_dir) / REPORT_JSON).write_text(json.dumps(report))
        (Path(run_dir) / REPORT_HTML).write_text("<html></html>")
        return report

    def trained(self, stage=None):
        return [c for c in self.calls if c[0] == "train" and (stage is None or c[2] == stage)]


@pytest.fixture
def recorder(monkeypatch):
    import analysis.run
    import pipeline.report
    from pipeline import reproduce

    rec = Recorder()
    monkeypatch.setattr(reproduce, "_train", rec.train)
    monkeypatch.setattr(analysis.run, "analyze", rec.analyze)
    monkeypatch.setattr(analysis.run, "evaluate", rec.evaluate)
    monkeypatch.setattr(pipeline.report, "write_report", rec.write_report)
    return rec


def _cli(*argv: str) -> int:
    from moe_vlm_cli import main

    return main(["reproduce", *argv])


def test_three_seeds_share_one_cached_pretraining_and_run_each_protocol(tmp_path, cache, recorder):
    out = tmp_path / "run"
    assert _cli("--seeds", "0", "1", "2", "--out", str(out)) == 0

    key = pretrain_cache.current_key()
    cached = cache / "pretrain" / key
    (pretrain,) = recorder.trained("pretrain")  # once for all seeds, into the partial sibling, recipe's seed
    assert pretrain[1:] == (cached.with_name(key + ".partial"), "pretrain", None, None, ())
    assert pretrain_cache.is_complete(cached)
    for s in (0, 1, 2):
        run = out / f"seed{s}"
        assert (run / "pretrain").is_symlink() and (run / "pretrain").resolve() == cached.resolve()
        steps = [(c[1], c[2], c[3], c[4]) for c in recorder.trained() if c[4] == s]
        assert steps == [
            (run / "stage0", "0", run / "pretrain", s),
            (run / "stage1", "1", run / "stage0", s),
            (run / "stage2", "2", run / "stage1", s),
            (run / "stage3", "3", run / "stage2", s),
            (run / "dense", "dense", run / "stage1", s),
        ]
        for kind in ("analyze", "evaluate"):
            assert [c[1] for c in recorder.calls if c[0] == kind and c[2] == s] == [
                run / "stage2",
                run / "stage3",
                run / "dense",
            ]
        assert json.loads((run / REPORT_JSON).read_text())["pretraining"] == {
            "dir": str(cached.resolve()),
            "key": key,
            "cached": True,
        }

    report = json.loads((out / REPORT_JSON).read_text())
    assert report["seeds"] == [0, 1, 2]
    assert report["headline"]["cider_stage2"]["per_seed"] == {"0": 10.0, "1": 11.0, "2": 12.0}
    assert report["headline"]["cider_stage2"]["mean"] == pytest.approx(11.0)
    assert report["comparison_with_paper"][0]["verdict"] == "agrees"
    assert "train pretrain (shared)" in report["timings_seconds"]
    assert (out / REPORT_HTML).is_file()

    # everything is complete: a second invocation trains and analyses nothing, and rewrites the reports
    n = len(recorder.calls)
    assert _cli("--seeds", "0", "1", "2", "--out", str(out)) == 0
    assert len(recorder.calls) == n

    # a new run directory finds the pretraining in the cache
    assert _cli("--seed", "5", "--out", str(tmp_path / "other")) == 0
    assert len(recorder.trained("pretrain")) == 1


def test_an_interrupted_multi_seed_run_resumes_where_it_stopped(tmp_path, recorder):
    out = tmp_path / "run"
    recorder.fail_at = ("2", 1)
    with pytest.raises(KeyboardInterrupt):
        _cli("--seeds", "0", "1", "2", "--out", str(out))
    assert not (out / REPORT_JSON).exists() and (out / "seed0" / REPORT_JSON).is_file()
    done = len(recorder.calls)
    recorder.fail_at = None
    assert _cli("--seeds", "0", "1", "2", "--out", str(out)) == 0
    resumed = [(c[2], c[4]) for c in recorder.calls[done:] if c[0] == "train"]
    assert resumed == [("2", 1), ("3", 1), ("dense", 1)] + [(s, 2) for s in ("0", "1", "2", "3", "dense")]
    assert not [c for c in recorder.calls[done:] if c[0] != "train" and c[2] == 0]  # seed 0 was finished
    assert json.loads((out / REPORT_JSON).read_text())["seeds"] == [0, 1, 2]


def test_one_seed_keeps_todays_layout(tmp_path, cache, recorder):
    out = tmp_path / "run"
    assert _cli("--seeds", "3", "--out", str(out)) == 0
    assert (out / "pretrain").is_symlink() and (out / "stage3" / COMPLETION_MARKER).is_file()
    assert not list(out.glob("seed*"))
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["seed"] == 3 and "train pretrain" in report["timings_seconds"]
    assert {c[4] for c in recorder.trained() if c[2] != "pretrain"} == {3}


def test_no_cache_builds_the_shared_pretraining_inside_the_output_folder(tmp_path, cache, recorder):
    out = tmp_path / "run"
    assert _cli("--seeds", "0", "1", "--no-cache", "--out", str(out)) == 0
    assert pretrain_cache.is_complete(out / "pretrain") and not (out / "pretrain").is_symlink()
    assert not (cache / "pretrain").exists()
    for s in (0, 1):
        assert os.readlink(out / f"seed{s}" / "pretrain") == os.path.join(os.pardir, "pretrain")
        info = json.loads((out / f"seed{s}" / REPORT_JSON).read_text())["pretraining"]
        assert info["key"] == pretrain_cache.current_key() and info["cached"] is False
    assert len(recorder.trained("pretrain")) == 1


def test_a_run_keeps_its_pretraining_and_rebuild_trains_it_again(tmp_path, recorder):
    out = tmp_path / "run"
    assert _cli("--seed", "0", "--out", str(out)) == 0
    assert _cli("--seed", "0", "--out", str(out), "--rebuild-pretraining") == 0
    pretrains = recorder.trained("pretrain")
    assert len(pretrains) == 2 and pretrains[1][5] == ()  # from scratch, not resumed
    assert len(recorder.trained("0")) == 1  # finished later steps are kept


def test_one_output_folder_holds_one_layout(tmp_path, recorder):
    from pipeline.reproduce import reproduce, reproduce_seeds

    single = tmp_path / "single"
    reproduce(single, seed=0)
    with pytest.raises(ValueError, match="single-seed run"):
        reproduce_seeds(single, [0, 1])
    multi = tmp_path / "multi"
    reproduce_seeds(multi, [0, 1])
    with pytest.raises(ValueError, match="multi-seed run"):
        reproduce(multi, seed=0)
    with pytest.raises(ValueError, match="repeats"):
        reproduce_seeds(tmp_path / "x", [1, 1])


def test_seed_and_seeds_are_exclusive(tmp_path, recorder, capsys):
    # (`--seed 0` is the default value: argparse would not see the clash if the default were 0 itself)
    with pytest.raises(SystemExit):
        _cli("--seed", "0", "--seeds", "1", "2", "--out", str(tmp_path / "run"))
    assert "not allowed with" in capsys.readouterr().err
    assert recorder.calls == []


def test_a_changed_recipe_builds_anew_but_a_started_run_keeps_its_pretraining(
    tmp_path, recorder, monkeypatch, capsys
):
    out = tmp_path / "run"
    assert _cli("--seed", "0", "--out", str(out)) == 0
    first = (out / "pretrain").resolve()
    original = pretrain_cache.recipe_inputs
    monkeypatch.setattr(  # as if trainer/pretrain.py had changed
        pretrain_cache,
        "recipe_inputs",
        lambda **kw: {**original(**kw), "source:trainer/pretrain.py": "changed"},
    )
    assert _cli("--seed", "0", "--out", str(out)) == 0
    assert len(recorder.trained("pretrain")) == 1 and (out / "pretrain").resolve() == first
    assert "the pretraining this run started with" in capsys.readouterr().out
    assert _cli("--seed", "0", "--out", str(tmp_path / "new")) == 0
    assert len(recorder.trained("pretrain")) == 2
    assert (tmp_path / "new" / "pretrain").resolve() != first


def test_the_report_records_the_seed_and_package_versions(tmp_path, recorder):
    """What a rerun must match to give the same numbers: the seed(s) and the versions, in report.json and shown in
    report.html (one seed's report and the report across seeds)."""
    from importlib.metadata import version
    from platform import python_version

    from pipeline.report import _html

    assert _cli("--seed", "3", "--out", str(tmp_path / "one")) == 0
    report = json.loads((tmp_path / "one" / REPORT_JSON).read_text())
    assert report["seed"] == 3
    versions = report["versions"]
    assert versions["python"] == python_version()
    for name in ("torch", "transformers", "datasets", "accelerate", "numpy", "safetensors"):
        assert versions[name] == version(name)
    page = _html({**report, "invariants": [], "table": [], "comparison_with_paper": []}, tmp_path / "one")
    assert (
        "<h2>Ran with</h2>" in page
        and f"<td>torch</td><td style='text-align:left'>{versions['torch']}" in page
    )
    assert "<td>seed</td><td style='text-align:left'>3</td>" in page

    assert _cli("--seeds", "0", "1", "--out", str(tmp_path / "two")) == 0
    aggregate = json.loads((tmp_path / "two" / REPORT_JSON).read_text())
    assert aggregate["versions"] == versions and aggregate["seeds"] == [0, 1]
    page = (tmp_path / "two" / REPORT_HTML).read_text()
    assert "<td>seeds</td><td style='text-align:left'>0, 1</td>" in page and versions["transformers"] in page
