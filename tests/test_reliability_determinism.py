"""Determinism on CPU: the same seed gives the same training losses and weights, and the same analysis numbers, in
two runs; another seed gives other losses (so the comparison can fail). The Shapes world's own determinism is
`test_data_shapes.py::test_deterministic_from_seed`; the report's record of seed and versions is
`test_seeds.py::test_the_report_records_the_seed_and_package_versions`."""

from __future__ import annotations

import json

import pytest
import torch
from training_helpers import make_stage0, quick_args, train, weights


@pytest.fixture(scope="module")
def shapes(workdir):
    """A Shapes world for both training and the analyses (concept probes and test images enough for them)."""
    from trainer.data import build_shapes

    path = workdir / "shapes"
    build_shapes(
        path, seed=0, image_size=32, n_train=48, n_val=8, n_test=12, n_instruct=8, n_probe=3, n_compositional=2
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def runs(workdir, shapes):
    """Stage 1 from one Stage 0, four steps logged at each: seed 0 twice, seed 1 once."""
    stage0 = make_stage0(workdir / "stage0")
    return {
        name: train("1", workdir / name, stage0, quick_args(shapes, logging_steps=1, seed=seed))
        for name, seed in (("a", 0), ("b", 0), ("other_seed", 1))
    }


def losses(directory) -> list[float]:
    state = json.loads((directory / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def without_timings(value):
    """`value` without the wall-clock fields (`seconds`, `*_seconds`), which differ between any two runs."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def test_same_seed_same_losses_and_weights(runs):
    a, b, other = (losses(runs[name]) for name in ("a", "b", "other_seed"))
    assert len(a) == 4 and a == b  # exactly, not approximately
    assert other != a, "another seed gave the same losses: the comparison above could not fail"
    wa, wb = weights(runs["a"]), weights(runs["b"])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], v) for k, v in weights(runs["other_seed"]).items())


def test_same_seed_same_analysis_numbers(runs, shapes, workdir):
    from analysis.run import analyze

    fields = dict(
        data_dir=shapes, n_samples=8, n_permutations=20, n_grounding=2, grounding_max_new_tokens=2, batch_size=8,
        n_instruction=0,
    )  # fmt: skip
    results = [analyze(runs["a"], workdir / f"analysis_{i}", seed=0, **fields) for i in range(2)]
    assert "seconds" in results[0]  # the field dropped below exists: the comparison is of everything else
    first, second = (without_timings(r) for r in results)
    assert first == second
    for i in range(2):
        written = json.loads((workdir / f"analysis_{i}" / "analysis.json").read_text())
        assert without_timings(written) == first
