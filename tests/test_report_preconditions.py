"""The report's preconditions, on a constructed run directory (analysis.json / captioning.json / the pretraining
marker written by hand, no training): invariants start with the vision probe and grounding, every comparison with
the paper states its precondition and reads n/a when it fails, both matrices appear at every layer, and
`headline` is a flat {name: float} dict."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from configuration.contract import ANALYSIS_FILE, CAPTIONING_FILE, COMPLETION_MARKER, REPORT_HTML
from pipeline.report import GROUNDING_CHECK, VISION_PROBE_CHECK, write_report

GOOD_PROBE = {"shape_accuracy": 0.95, "colour_accuracy": 1.0, "zero_shot_shape_accuracy": 0.8, "n_test": 400}


def _diag(k, p, n=8):
    return {
        "k": k,
        "n": n,
        "k_over_n_ci": [max(k - 1, 0) / n, min(k + 1, n) / n],
        "binomial": {"k": k, "n": n, "null_p": 1 / n, "p_value": p, "mean_margin": 0.01 * k},
        "permutation": {"p_value_k": p, "p_value_margin": p},
        "bootstrap": {"k_ci": [max(k - 1, 0), min(k + 1, n)], "margin_ci": [0.0, 0.02 * k]},
        "offsets": {"offset_share": 0.99 if p > 0.05 else 0.3},
    }


def _analysis(
    raw_p=0.26, centred_p=0.26, silhouette=(0.43, 0.05), interval=None, obj=0.49, attr=0.5, ground=0.9
):
    """One analysis.json: two layers; the diagonal's p per variant (k follows), silhouettes, binding, grounding."""
    k = {p: (6 if p < 0.05 else 1) for p in (raw_p, centred_p)}
    modality, concept = silhouette
    return {
        "concept_matrices": {
            "raw": {"0": _diag(1, 0.66), "1": _diag(k[raw_p], raw_p)},
            "centred": {"0": _diag(1, 0.66), "1": _diag(k[centred_p], centred_p)},
        },
        "binomial": {"1": {"k": k[raw_p], "n": 8, "p_value": raw_p}},
        "tsne": {
            "layer": 1,
            "silhouette_modality_hidden": modality,
            "silhouette_concept_hidden": concept,
            "silhouette_modality_hidden_interval": interval or [modality - 0.02, modality + 0.02],
        },
        "compositional": {
            "1": {
                "binding": {
                    "attribute": {
                        "fraction": attr,
                        "n_wins": int(attr * 100),
                        "n_ties": 0,
                        "n_comparisons": 100,
                    },
                    "object": {"fraction": obj, "n_wins": int(obj * 100), "n_ties": 0, "n_comparisons": 100},
                    "swap": {"fraction": 0.5, "n_wins": 5, "n_ties": 0, "n_comparisons": 10},
                }
            }
        },
        "grounding": {"n": 64, "shape_accuracy": ground, "colour_accuracy": ground},
        "load": {"n_collapsed": 1, "n_layers": 2, "layers": {}},
        "crossover": {"increase_pct": 5.0},
    }


def _run(tmp_path: Path, probe=GOOD_PROBE, cider=None, **models) -> dict:
    """Write the models' analysis.json + a captioning.json each, and the pretraining marker; build the report."""
    pretrain = tmp_path / "pretrain"
    pretrain.mkdir(parents=True, exist_ok=True)
    marker = {"stage": "pretrain"} if probe is None else {"stage": "pretrain", "vision_probe": probe}
    (pretrain / COMPLETION_MARKER).write_text(json.dumps(marker))
    cider = {"stage2": 80.0, "stage3": 10.0, "dense": 70.0, **(cider or {})}
    for name, analysis in models.items():
        folder = tmp_path / "analysis" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ANALYSIS_FILE).write_text(json.dumps(analysis))
        scaled = {"Bleu_4": 20.0, "METEOR": 25.0, "ROUGE_L": 50.0, "CIDEr": cider[name]}
        (folder / CAPTIONING_FILE).write_text(json.dumps({"metrics": {"scaled": scaled}}))
    return write_report(tmp_path, {"stage2": 1.0})


def _claim(report: dict, start: str) -> dict:
    (entry,) = [c for c in report["comparison_with_paper"] if c["paper"].startswith(start)]
    for key in ("paper", "precondition", "precondition_met", "measured", "agrees", "interval"):
        assert key in entry
    if not entry["precondition_met"]:
        assert entry["agrees"] is None and entry["measured"].startswith("n/a: ")
    return entry


def test_invariants_start_with_the_vision_probe_and_grounding(tmp_path):
    report = _run(tmp_path, stage2=_analysis(ground=0.9))
    first, second = report["invariants"][:2]
    assert (first["name"], second["name"]) == (VISION_PROBE_CHECK, GROUNDING_CHECK)
    assert first["passed"] and second["passed"]
    assert report["preconditions"] == {VISION_PROBE_CHECK: True, GROUNDING_CHECK: True}

    failing = _run(
        tmp_path / "b", probe={**GOOD_PROBE, "zero_shot_shape_accuracy": 0.5}, stage2=_analysis(ground=0.7)
    )
    probe, ground = failing["invariants"][:2]
    assert not probe["passed"] and "zero_shot_shape_accuracy 0.500 below 0.7" in probe["detail"]
    assert not ground["passed"] and "shape_accuracy 0.700 below 0.8" in ground["detail"]

    absent = _run(tmp_path / "c", probe=None, stage2=_analysis())
    assert not absent["invariants"][0]["passed"] and "no `vision_probe`" in absent["invariants"][0]["detail"]
    # the Stage-2 alignment claim rests on the probe: n/a without it
    assert _claim(absent, "Stage 2 aligns")["agrees"] is None


def test_no_stage2_diagonal_makes_losing_it_na(tmp_path):
    report = _run(tmp_path, stage2=_analysis(), stage3=_analysis(), dense=_analysis())
    s2 = _claim(report, "Stage 2 aligns")
    assert s2["precondition_met"] and s2["agrees"] is False and "neither matrix" in s2["measured"]
    lost = _claim(report, "Stage 3 loses")
    assert not lost["precondition_met"] and "no diagonal" in lost["measured"]


def test_a_centred_diagonal_is_judged_in_the_centred_matrix(tmp_path):
    report = _run(tmp_path, stage2=_analysis(centred_p=1e-5), stage3=_analysis(), dense=_analysis())
    s2 = _claim(report, "Stage 2 aligns")
    assert s2["agrees"] is True and "diagonal (p < 0.05) in: centred" in s2["measured"]
    lost = _claim(report, "Stage 3 loses")
    assert lost["precondition_met"] and lost["agrees"] is True and "(centred)" in lost["precondition"]
    assert set(lost["interval"]) == {"centred"}
    kept = _run(
        tmp_path / "b", stage2=_analysis(centred_p=1e-5), stage3=_analysis(centred_p=1e-4), dense=_analysis()
    )
    assert _claim(kept, "Stage 3 loses")["agrees"] is False


def test_modality_clustering_is_judged_against_stage2_and_the_dense_control(tmp_path):
    same = _run(
        tmp_path, stage2=_analysis(silhouette=(0.43, 0.05)), stage3=_analysis(silhouette=(0.45, 0.05)),
        dense=_analysis(silhouette=(0.42, 0.05)),
    )  # fmt: skip
    claim = _claim(same, "Stage 3 hidden states cluster")
    assert claim["precondition_met"] and claim["agrees"] is False  # clusters as Stage 2 and dense do
    apart = _run(
        tmp_path / "b", stage2=_analysis(silhouette=(0.43, 0.05)), stage3=_analysis(silhouette=(0.8, 0.05)),
        dense=_analysis(silhouette=(0.42, 0.05)),
    )  # fmt: skip
    assert _claim(apart, "Stage 3 hidden states cluster")["agrees"] is True
    overlap = _run(
        tmp_path / "c", stage2=_analysis(silhouette=(0.43, 0.05)),
        stage3=_analysis(silhouette=(0.8, 0.05), interval=[0.3, 0.9]), dense=_analysis(silhouette=(0.42, 0.05)),
    )  # fmt: skip
    assert _claim(overlap, "Stage 3 hidden states cluster")["agrees"] is False
    alone = _run(tmp_path / "d", stage2=_analysis(), stage3=_analysis(silhouette=(0.8, 0.05)))
    assert not _claim(alone, "Stage 3 hidden states cluster")["precondition_met"]


def test_colour_binding_needs_object_binding_above_chance(tmp_path):
    chance = _run(tmp_path, stage2=_analysis(obj=0.49, attr=0.5))
    claim = _claim(chance, "Stage 2 fails to bind colour")
    assert not claim["precondition_met"] and "object binding is at chance" in claim["measured"]
    seen = _run(tmp_path / "b", stage2=_analysis(obj=0.9, attr=0.5))
    claim = _claim(seen, "Stage 2 fails to bind colour")
    assert claim["precondition_met"] and claim["agrees"] is True
    assert claim["interval"][0] < 0.5 < claim["interval"][1]
    bound = _run(tmp_path / "c", stage2=_analysis(obj=0.9, attr=0.85))
    assert _claim(bound, "Stage 2 fails to bind colour")["agrees"] is False


def test_captioning_drop_needs_stage2_grounding(tmp_path):
    ungrounded = _run(tmp_path, stage2=_analysis(ground=0.3), stage3=_analysis(ground=0.1))
    claim = _claim(ungrounded, "Captioning collapses")
    assert not claim["precondition_met"] and "CIDEr 80.0 -> 10.0" in claim["measured"]
    grounded = _run(tmp_path / "b", stage2=_analysis(ground=0.9), stage3=_analysis(ground=0.1))
    claim = _claim(grounded, "Captioning collapses")
    assert claim["agrees"] is True and "keeps 12% of it" in claim["measured"]
    # a fall that keeps more than half of Stage 2's CIDEr is a drop, not the paper's collapse
    dip = _run(
        tmp_path / "c", cider={"stage3": 60.0}, stage2=_analysis(ground=0.9), stage3=_analysis(ground=0.9)
    )
    assert _claim(dip, "Captioning collapses")["agrees"] is False
    half = _run(
        tmp_path / "d", cider={"stage3": 40.0}, stage2=_analysis(ground=0.9), stage3=_analysis(ground=0.9)
    )
    assert _claim(half, "Captioning collapses")["agrees"] is True


def test_table_headline_and_html_carry_both_matrices_and_grounding(tmp_path):
    report = _run(tmp_path, stage2=_analysis(centred_p=1e-5), stage3=_analysis(ground=0.2), dense=_analysis())
    rows = {r["key"]: r for r in report["table"]}
    assert rows["stage3"]["grounding_shape"] == 0.2 and rows["stage2"]["grounding_colour"] == 0.9
    assert rows["stage2"]["diagonal"]["centred"]["k"] == 6 and rows["stage2"]["binomial_k"] == 1
    headline = report["headline"]
    assert all(isinstance(v, float) and math.isfinite(v) for v in headline.values())
    assert headline["stage2_centred_diagonal_k_over_n"] == 0.75
    assert headline["stage2_raw_diagonal_p_binomial"] == 0.26
    assert headline["stage3_grounding_shape_accuracy"] == 0.2 and headline["dense_captioning_CIDEr"] == 70.0
    assert headline["stage2_collapsed_layers"] == 1.0 and headline["stage3_silhouette_modality"] == 0.43
    assert headline["stage2_binding_object"] == 0.49 and headline["vision_probe_shape_accuracy"] == 0.95
    assert set(report["concept_matrices"]["stage2"]) == {"raw", "centred"}
    assert set(report["concept_matrices"]["stage2"]["centred"]) == {"0", "1"}
    page = (tmp_path / REPORT_HTML).read_text()
    assert (
        "Concept matrices: raw (the paper&#x27;s) and centred" in page
        or "raw (the paper's) and centred" in page
    )
    assert page.count("<td>centred</td>") == 6  # 3 models x 2 layers
    assert "n/a" in page and "precondition" in page
    assert json.loads((tmp_path / "report.json").read_text())["headline"] == headline


@pytest.mark.parametrize("key", ["binomial", "concept_matrices"])
def test_older_analysis_without_both_variants_still_reports_raw(tmp_path, key):
    analysis = _analysis()
    if key == "concept_matrices":  # an analysis.json written before both variants existed
        analysis.pop("concept_matrices")
        analysis["binomial"] = {"0": {"k": 2, "n": 8, "null_p": 0.125, "p_value": 0.26}}
    report = _run(tmp_path, stage2=analysis)
    row = report["table"][0]
    assert row["binomial_k"] is not None and "raw" in row["diagonal"]


def test_routing_claims_need_their_routing_preconditions(tmp_path):
    # no checkpoints on disk: the routers cannot be shown to have moved, and no Stage-2 load layer shows exact dispatch
    report = _run(tmp_path, stage2=_analysis(), stage3=_analysis())
    collapse = _claim(report, "Stage 3: most layers collapse")
    assert not collapse["precondition_met"] and "routers were not shown to have moved" in collapse["measured"]
    crossover = _claim(report, "Inverting Stage 2 routing")
    assert not crossover["precondition_met"] and "+5.0%" in crossover["measured"]
