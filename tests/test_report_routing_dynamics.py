"""The report shows collapse under both definitions (table, the "most layers collapse" claim, headline) and Stage 3's
routing over training (the figure inlined with its caption, the onsets per layer, headline numbers per layer), on a
constructed run directory (analysis.json written by hand, no training)."""

from __future__ import annotations

import base64
import json

from PIL import Image
from test_report_preconditions import _analysis, _claim, _run

from configuration.contract import REPORT_HTML


def _load(hard: list[int], soft: list[int], n_layers: int = 4) -> dict:
    return {
        "n_layers": n_layers,
        "layers": {},
        "n_collapsed": len(hard),
        "collapsed_layers": hard,
        "collapse_threshold": 0.99,
        "n_collapsed_soft": len(soft),
        "collapsed_layers_soft": soft,
        "soft_collapse_threshold": 0.9,
    }


DYNAMICS = {
    "stage": "3",
    "figure": "routing_dynamics.png",
    "n_logs": 4,
    "first_step": 10,
    "last_step": 40,
    "probe": {"split": "validation", "n_samples": 8, "mode": "eval"},
    "collapse_threshold": 0.99,
    "soft_collapse_threshold": 0.9,
    "collapse": {},
    "final": {},
    "layers": {
        "0": {"train_hard_first_step": 20, "train_soft_first_step": None, "probe_hard_first_step": 40,
              "probe_soft_first_step": None, "train_agreement": 0.9, "probe_logit_gap": 0.5, "probe_dispatch0": 1.0},
        "1": {"train_hard_first_step": 40, "train_soft_first_step": 30, "probe_hard_first_step": 30,
              "probe_soft_first_step": 30, "train_agreement": 0.8, "probe_logit_gap": -4.0, "probe_dispatch0": 0.0},
    },
}  # fmt: skip


def _stage3(**extra) -> dict:
    return {**_analysis(), "load": _load(hard=[0, 1, 3], soft=[3]), **extra}


def test_collapse_under_both_definitions_in_table_claim_and_headline(tmp_path):
    report = _run(tmp_path, stage2={**_analysis(), "load": _load([], [])}, stage3=_stage3())
    rows = {r["key"]: r for r in report["table"]}
    assert (rows["stage3"]["collapsed"], rows["stage3"]["collapsed_soft"]) == (3, 1)
    claim = _claim(report, "Stage 3: most layers collapse")
    assert "hard definition: one expert takes ≥ 99% of all tokens' top-1 dispatch" in claim["paper"]
    # no checkpoints on disk: the precondition fails, and both counts are still shown
    assert (
        "hard (the paper's: one expert takes ≥ 99% of all tokens' top-1 dispatch): 3/4 layers [0, 1, 3]"
        in (claim["measured"])
    )
    assert (
        "soft (one expert's mean router probability over all tokens is ≥ 90%): 1/4 layers [3]"
        in claim["measured"]
    )
    headline = report["headline"]
    assert headline["stage3_collapsed_layers"] == 3.0 and headline["stage3_collapsed_soft_layers"] == 1.0
    assert headline["stage2_collapsed_soft_layers"] == 0.0
    assert not any("agreement" in k or "logit_gap" in k for k in headline)  # no routing log analysed
    page = (tmp_path / REPORT_HTML).read_text()
    assert "<th>collapsed layers (hard)</th><th>collapsed layers (soft)</th>" in page
    assert "<td>3/4</td><td>1/4</td></tr>" in page and "<td>0/4</td><td>0/4</td></tr>" in page
    assert "Stage 3 routing over training" not in page


def test_claim_reads_the_thresholds_analysis_used(tmp_path):
    load = {**_load([0], [0, 1]), "collapse_threshold": 0.95, "soft_collapse_threshold": 0.8}
    report = _run(tmp_path, stage2=_analysis(), stage3={**_analysis(), "load": load})
    claim = _claim(report, "Stage 3: most layers collapse")
    assert "≥ 95% of all tokens' top-1 dispatch" in claim["paper"] and "is ≥ 80%): 2/4" in claim["measured"]


def test_stage3_routing_dynamics_figure_onsets_and_headline(tmp_path):
    figure = tmp_path / "analysis" / "stage3" / "routing_dynamics.png"
    figure.parent.mkdir(parents=True)
    Image.new("RGB", (13, 8), "blue").save(figure)
    other = tmp_path / "analysis" / "stage3" / "expert_load.png"
    Image.new("RGB", (4, 4), "red").save(other)
    stage2_figure = tmp_path / "analysis" / "stage2" / "routing_dynamics.png"
    stage2_figure.parent.mkdir(parents=True)
    Image.new("RGB", (9, 9), "green").save(stage2_figure)
    stage2 = {**_analysis(), "routing_dynamics": {**DYNAMICS, "stage": "2", "collapse_threshold": 0.95}}
    report = _run(tmp_path, stage2=stage2, stage3=_stage3(routing_dynamics=DYNAMICS))
    headline = report["headline"]
    assert (
        headline["stage3_train_agreement_layer0"] == 0.9 and headline["stage3_train_agreement_layer1"] == 0.8
    )
    assert headline["stage3_probe_logit_gap_layer1"] == -4.0
    assert report["routing_dynamics"] == {"stage2": stage2["routing_dynamics"], "stage3": DYNAMICS}
    assert (
        json.loads((tmp_path / "report.json").read_text())["routing_dynamics"] == report["routing_dynamics"]
    )
    assert not any(k.startswith("stage2_") and "agreement" in k for k in headline)  # Stage 3's only

    page = (tmp_path / REPORT_HTML).read_text()
    section = page[page.index("<h2>Stage 3 routing over training</h2>") : page.index("<h2>Figures</h2>")]
    encoded = base64.b64encode(figure.read_bytes()).decode()
    assert f"data:image/png;base64,{encoded}" in section
    assert page.count(encoded) == 1  # inlined once, in its own section, not again among the other figures
    assert base64.b64encode(other.read_bytes()).decode() in page[page.index("<h2>Figures</h2>") :]
    caption = section[section.index("<figcaption>") : section.index("</figcaption>")]
    for words in ("hard top-1 dispatch to expert 0", "soft load of expert 0", "logit gap", "Solid lines: the "
                  "training batches", "dashed lines: a fixed held-out probe routed in eval mode"):  # fmt: skip
        assert words in caption.replace("&#x27;", "'"), words
    # the onsets per layer: hard / soft first step (training, probe), last agreement and probe gap
    assert "<tr><td>1</td><td>40</td><td>30</td><td>30</td><td>30</td><td>0.8</td><td>-4</td></tr>" in section
    assert "<tr><td>0</td><td>20</td><td>–</td><td>40</td><td>–</td><td>0.9</td><td>0.5</td></tr>" in section
    assert "8 validation records, eval mode" in section
    assert "(hard dispatch ≥ 99%, soft load ≥ 90%)" in caption
    # Stage 2's routing-dynamics figure stays among the figures, captioned at its own thresholds
    figures = page[page.index("<h2>Figures</h2>") :]
    at = figures.index(base64.b64encode(stage2_figure.read_bytes()).decode())
    assert "(hard dispatch ≥ 95%, soft load ≥ 90%)" in figures[at : figures.index("</figcaption>", at)]
