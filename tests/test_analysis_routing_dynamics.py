"""`moe-vlm analyze` reads the stage's routing log: analysis.json's `routing_dynamics` (when each layer collapsed during
training under both definitions, the last logged routing of the training batches and of the eval-mode probe) and the
`routing_dynamics.png` figure; a model directory without a log (dense, a Hub id) gets neither."""

from __future__ import annotations

import json

from PIL import Image
from test_routing_dynamics import _stats

from analysis.load import routing_dynamics
from analysis.run import ROUTING_DYNAMICS_FIGURE, analyze_routing_log, routing_dynamics_summary
from configuration.contract import LOAD_GROUPS, ROUTING_LOG_FILE

# Layer 0 hard-collapses onto expert 0 at step 20 (soft load stays 60/40); layer 1 soft-collapses onto expert 1 at
# step 30 and hard at step 40. The probe (eval mode: agreement 1) is decided more slowly: layer 0 only at step 40.
TRAIN = {
    "0": [(0.7, 0.55, 0.2, 0.6), (0.995, 0.6, 0.4, 0.7), (0.99, 0.61, 0.45, 0.8), (0.999, 0.62, 0.5, 0.9)],
    "1": [(0.5, 0.5, 0.0, 0.5), (0.2, 0.2, -1.0, 0.6), (0.05, 0.08, -2.5, 0.7), (0.0, 0.02, -4.0, 0.8)],
}
PROBE = {
    "0": [(0.5, 0.55, 0.2), (0.9, 0.6, 0.4), (0.95, 0.61, 0.45), (1.0, 0.62, 0.5)],
    "1": [(0.5, 0.5, 0.0), (0.1, 0.2, -1.0), (0.0, 0.08, -2.5), (0.0, 0.02, -4.0)],
}


def routing_log(with_probe: bool = True) -> list[dict]:
    records = []
    for i, step in enumerate((10, 20, 30, 40)):
        record = {
            "step": step,
            "stage": "3",
            "layers": {
                layer: {m: _stats(*v[i][:3], tokens=50, agreement=v[i][3]) for m in LOAD_GROUPS}
                for layer, v in TRAIN.items()
            },
        }
        if with_probe:
            layers = {
                layer: {m: _stats(*v[i], tokens=50, agreement=1.0) for m in LOAD_GROUPS}
                for layer, v in PROBE.items()
            }
            record["probe"] = {"split": "validation", "n_samples": 8, "mode": "eval", "layers": layers}
        records.append(record)
    return records


def _write_log(directory, records) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ROUTING_LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))


def test_summary_keeps_collapse_onsets_and_the_last_logged_routing():
    dynamics = routing_dynamics(routing_log()[::-1])
    summary = routing_dynamics_summary(dynamics)
    assert summary["collapse"] == dynamics["collapse"]
    assert (summary["n_logs"], summary["first_step"], summary["last_step"]) == (4, 10, 40)
    assert summary["probe"] == {"split": "validation", "n_samples": 8, "mode": "eval"}
    assert (summary["collapse_threshold"], summary["soft_collapse_threshold"]) == (0.99, 0.9)
    layer0, layer1 = summary["layers"]["0"], summary["layers"]["1"]
    assert layer0["train_hard_first_step"] == 20 and layer0["train_soft_first_step"] is None
    assert layer0["probe_hard_first_step"] == 40 and layer0["probe_soft_first_step"] is None
    assert layer1["train_soft_first_step"] == 30 and layer1["train_hard_first_step"] == 40
    assert layer1["probe_hard_first_step"] == 30 and layer1["probe_soft_first_step"] == 30
    assert layer0["train_agreement"] == 0.9 and layer1["probe_logit_gap"] == -4.0
    assert layer0["probe_dispatch0"] == 1.0
    final = summary["final"]["train"]["1"]["image"]
    assert final == {
        "step": 40,
        "dispatch0": 0.0,
        "prob0": 0.02,
        "logit_gap": -4.0,
        "logit_margin": 4.0,
        "entropy": 0.5,
        "agreement": 0.8,
    }
    assert summary["final"]["probe"]["0"]["all"]["agreement"] == 1.0
    json.dumps(summary, allow_nan=False)


def test_summary_of_a_log_without_probe_or_logit_fields():
    old = routing_log(with_probe=False)
    for record in old:
        for per_modality in record["layers"].values():
            for stats in per_modality.values():
                for name in ("logit_gap", "logit_margin", "agreement"):
                    stats.pop(name)
    summary = routing_dynamics_summary(routing_dynamics(old))
    assert summary["probe"] is None and summary["final"]["probe"] == {}
    assert summary["layers"]["0"]["train_hard_first_step"] == 20
    assert summary["layers"]["0"]["probe_hard_first_step"] is None
    assert (
        summary["layers"]["0"]["train_agreement"] is None
        and summary["layers"]["1"]["probe_logit_gap"] is None
    )
    json.dumps(summary, allow_nan=False)


def test_analyze_routing_log_writes_the_figure_only_when_there_is_a_log(tmp_path):
    stage = tmp_path / "stage3"
    _write_log(stage, routing_log())
    out = tmp_path / "out"
    out.mkdir()
    summary, figure = analyze_routing_log(stage, out)
    assert figure == ROUTING_DYNAMICS_FIGURE
    with Image.open(out / figure) as image:
        assert image.size == (1300, 850)  # the figure's default 13 x 8.5 in at 100 dpi
    assert summary["stage"] == "3" and summary["source"] == ROUTING_LOG_FILE and summary["figure"] == figure
    assert summary == json.loads(json.dumps(summary))
    assert summary["collapse"]["train"]["0"]["hard"]["first_step"] == 20

    assert analyze_routing_log(tmp_path / "dense", out) == (None, None)  # no log: nothing to read
    assert analyze_routing_log("someone/not-a-local-dir", out) == (None, None)  # a Hub id
    _write_log(tmp_path / "empty", [{"step": 1, "stage": "3", "layers": {}}])
    skipped, none = analyze_routing_log(tmp_path / "empty", tmp_path / "empty_out")
    assert none is None and skipped["skipped"] == "no per-layer records" and skipped["n_logs"] == 1
