"""The reproduction report: executable invariants first, then a table shaped like the paper's, a plain statement
of where the results agree or disagree with the paper, the figures (inline) and the time per stage.

Every invariant is computed here from the artefacts on disk (checkpoints, markers, analysis.json), each able to
fail; nothing is tuned to match the paper and nothing is copied from it except the paper's own numbers, which
are labelled as such.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np
from safetensors import safe_open

from configuration.contract import (
    ANALYSIS_FILE,
    CAPTIONING_FILE,
    COMPLETION_MARKER,
    REPORT_HTML,
    REPORT_JSON,
)
from trainer.freezing import group_of

# The paper's numbers (Ticinovic & Han), quoted only for the comparison column.
PAPER = {
    "stage2_binomial": {"k": 6, "n": 8, "p": 8.52e-5},
    "crossover_increase_pct": 11.0,
    "captioning": {
        "stage2": {"Bleu_4": 31.9, "METEOR": 33.3, "ROUGE_L": 55.4, "CIDEr": 76.2},
        "stage3": {"Bleu_4": 4.2, "METEOR": 12.2, "ROUGE_L": 29.9, "CIDEr": 8.1},
    },
}


# ----- reading checkpoints ---------------------------------------------------------------------------------------
def _tensors(stage_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(stage_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                out[key] = handle.get_tensor(key).float().numpy()
    return out


def changed_groups(before: dict, after: dict) -> set[str]:
    """Groups (the trainer's, `trainer.freezing.group_of`) with at least one tensor that differs between two
    checkpoints (same names only)."""
    return {group_of(k) for k in after if k in before and not np.array_equal(before[k], after[k])}


# ----- invariants ------------------------------------------------------------------------------------------------
def _check(name: str, passed: bool, detail: str) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail}


def invariants(run_dir: Path, stages: dict[str, Path], analyses: dict[str, dict]) -> list[dict]:
    checks = []
    weights = {name: _tensors(path) for name, path in stages.items() if path.is_dir()}

    stage0 = weights.get("stage0", {})
    pairs = [
        (k, v)
        for k, v in stage0.items()
        if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj")
    ]
    identical = bool(pairs) and all(
        np.array_equal(v[0], v[e]) for _, v in pairs for e in range(1, v.shape[0])
    )
    checks.append(
        _check(
            "experts identical after upcycling (Stage 0)",
            identical,
            f"{len(pairs)} stacked expert tensors compared",
        )
    )

    order = [s for s in ("stage0", "stage1", "stage2", "stage3") if s in weights]
    if "dense" in weights and "stage1" in weights:
        order_pairs = list(zip(order, order[1:])) + [("stage1", "dense")]
    else:
        order_pairs = list(zip(order, order[1:]))
    for before, after in order_pairs:
        marker = json.loads((stages[after] / COMPLETION_MARKER).read_text())
        declared = set(marker.get("trainable", []))
        # (the dense control renames experts to a dense mlp: only tensors present in both are compared)
        changed = changed_groups(weights[before], weights[after])
        ok = bool(declared) and changed <= declared and "vision_tower" not in changed
        checks.append(
            _check(
                f"only the intended parameters changed ({before} -> {after})",
                ok,
                f"changed: {sorted(changed)}; declared trainable: {sorted(declared)}",
            )
        )

    if "stage3" in weights and "stage2" in weights:
        routers = [k for k in weights["stage3"] if k.endswith("mlp.gate.weight")]
        moved = [k for k in routers if not np.array_equal(weights["stage2"][k], weights["stage3"][k])]
        checks.append(
            _check(
                "Stage 3 routers moved",
                len(moved) == len(routers) > 0,
                f"{len(moved)}/{len(routers)} routers changed",
            )
        )

    s2 = analyses.get("stage2", {}).get("load")
    if s2:
        purity = [layer["purity"]["overall"] for layer in s2["layers"].values()]
        checks.append(
            _check(
                "Stage 2 dispatch exact (hard routing)",
                all(p == 1.0 for p in purity),
                f"purity per layer: {purity}",
            )
        )

    sums, entropies = [], []
    for result in analyses.values():
        for layer in result.get("load", {}).get("layers", {}).values():
            for modality in ("image", "text", "all"):
                block = layer[modality]
                if block["dispatch"] is not None:
                    sums.append(abs(sum(block["dispatch"]) - 1))
                    sums.append(abs(sum(block["soft_mass"]) - 1) if block.get("soft_mass") else 0.0)
                if block.get("routing_entropy") is not None:
                    entropies.append(block["routing_entropy"])
    bound = math.log(2)
    checks.append(
        _check(
            "per-layer loads sum to 1",
            bool(sums) and max(sums) < 1e-6,
            f"max |sum - 1| = {max(sums) if sums else 'n/a'}",
        )
    )
    checks.append(
        _check(
            "routing entropy within [0, ln E]",
            bool(entropies) and min(entropies) >= -1e-9 and max(entropies) <= bound + 1e-9,
            f"range [{min(entropies) if entropies else 'n/a'}, {max(entropies) if entropies else 'n/a'}], ln 2 = {bound:.4f}",
        )
    )

    bad = [
        f"{stage}:{k}"
        for stage, tensors in weights.items()
        for k, v in tensors.items()
        if not np.isfinite(v).all()
    ]
    losses = []
    for path in stages.values():
        marker_file = path / COMPLETION_MARKER
        if marker_file.is_file():
            loss = json.loads(marker_file.read_text()).get("train_loss")
            if loss is not None:
                losses.append(loss)
    bad += [f"train_loss={x}" for x in losses if not math.isfinite(x)]
    checks.append(
        _check(
            "no NaN/Inf in any checkpoint or training loss",
            not bad,
            f"{len(weights)} checkpoints, {len(losses)} losses; bad: {bad[:5]}",
        )
    )
    return checks


# ----- the paper-shaped table and the comparison -----------------------------------------------------------------
def _last(result: dict, key: str):
    block = result.get(key) or {}
    return block[max(block, key=int)] if block else None


def summary_rows(analyses: dict[str, dict], captioning: dict[str, dict]) -> list[dict]:
    rows = []
    for stage in ("stage2", "stage3", "dense"):
        if stage not in analyses and stage not in captioning:
            continue
        a, c = analyses.get(stage, {}), captioning.get(stage, {}).get("metrics", {})
        binomial = _last(a, "binomial") or {}
        rows.append(
            {
                "model": {
                    "stage2": "Stage 2 (hard routing)",
                    "stage3": "Stage 3 (Gumbel routing)",
                    "dense": "Dense control",
                }[stage],
                "key": stage,
                "Bleu_4": c.get("scaled", {}).get("Bleu_4"),
                "METEOR": c.get("scaled", {}).get("METEOR"),
                "ROUGE_L": c.get("scaled", {}).get("ROUGE_L"),
                "CIDEr": c.get("scaled", {}).get("CIDEr"),
                "binomial_k": binomial.get("k"),
                "binomial_n": binomial.get("n"),
                "binomial_p": binomial.get("p_value"),
                "layer": max(a["binomial"], key=int) if a.get("binomial") else None,
                "crossover_pct": a.get("crossover", {}).get("increase_pct"),
                "collapsed": a.get("load", {}).get("n_collapsed"),
                "n_layers": a.get("load", {}).get("n_layers"),
            }
        )
    return rows


def comparison(rows: list[dict], analyses: dict[str, dict]) -> list[dict]:
    """Plain statements: what the paper found, what this run measured, and whether they agree."""
    by = {r["key"]: r for r in rows}
    out = []

    def add(claim, measured, agrees):
        out.append({"paper": claim, "measured": measured, "agrees": None if agrees is None else bool(agrees)})

    if "stage2" in by and by["stage2"]["binomial_p"] is not None:
        r = by["stage2"]
        add(
            "Stage 2 aligns concepts across modalities: k=6/8, p≈8.5e-5 (last layer)",
            f"k={r['binomial_k']}/{r['binomial_n']}, p={r['binomial_p']:.3g} at layer {r['layer']}",
            r["binomial_p"] < 0.05,
        )
    if "stage2" in by and by["stage2"]["crossover_pct"] is not None:
        x = by["stage2"]["crossover_pct"]
        add("Inverting Stage 2 routing raises the loss by 11%", f"{x:+.1f}%", x > 0)
    if "stage3" in by and by["stage3"]["binomial_p"] is not None:
        r = by["stage3"]
        add(
            "Stage 3 loses the concept alignment (diagonal gone)",
            f"k={r['binomial_k']}/{r['binomial_n']}, p={r['binomial_p']:.3g}",
            r["binomial_p"] >= 0.05,
        )
    if "stage3" in by and by["stage3"]["collapsed"] is not None:
        r = by["stage3"]
        add(
            "Stage 3: most layers collapse to one expert (layer-level collapse)",
            f"{r['collapsed']}/{r['n_layers']} layers collapsed (≥99% of tokens on one expert)",
            r["collapsed"] > r["n_layers"] / 2,
        )
    if "stage3" in analyses and "stage2" in analyses:
        s2 = analyses["stage2"].get("tsne", {})
        s3 = analyses["stage3"].get("tsne", {})
        if s3.get("silhouette_modality_hidden") is not None:
            add(
                "Stage 3 hidden states cluster by modality rather than by concept",
                f"silhouette modality {s3['silhouette_modality_hidden']:.2f} vs concept {s3['silhouette_concept_hidden']:.2f}"
                f" (Stage 2: {s2.get('silhouette_modality_hidden', float('nan')):.2f} vs {s2.get('silhouette_concept_hidden', float('nan')):.2f})",
                s3["silhouette_modality_hidden"] > s3["silhouette_concept_hidden"],
            )
    if (
        "stage2" in by
        and "stage3" in by
        and by["stage2"]["CIDEr"] is not None
        and by["stage3"]["CIDEr"] is not None
    ):
        a, b = by["stage2"]["CIDEr"], by["stage3"]["CIDEr"]
        add("Captioning collapses after Stage 3 (CIDEr 76.2 -> 8.1)", f"CIDEr {a:.1f} -> {b:.1f}", b < a)
    comp = analyses.get("stage2", {}).get("compositional")
    if comp:
        last = comp[max(comp, key=int)]["binding"]
        attr = last.get("attribute", {})
        score = attr.get("fraction")
        if score is not None:
            add(
                "Stage 2 fails to bind colour to object ('red apple' ≈ 'green apple')",
                f"attribute binding win rate {score:.2f} (0.5 = colour ignored, 1 = bound)",
                score < 0.75,
            )
    return out


# ----- writing ---------------------------------------------------------------------------------------------------
def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(path.parent.name)}: {html.escape(path.stem)}</figcaption></figure>'


def _fmt(value, digits=3):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def write_report(run_dir: str | Path, timings: dict[str, float], extra: dict | None = None) -> dict:
    """Assemble `report.json` and a self-contained `report.html` in `run_dir` from what the run wrote there."""
    run_dir = Path(run_dir)
    stages = {name: run_dir / name for name in ("stage0", "stage1", "stage2", "stage3", "dense")}
    stages = {k: v for k, v in stages.items() if (v / COMPLETION_MARKER).is_file()}
    analyses, captioning = {}, {}
    for name in ("stage2", "stage3", "dense"):
        folder = run_dir / "analysis" / name
        if (folder / ANALYSIS_FILE).is_file():
            analyses[name] = json.loads((folder / ANALYSIS_FILE).read_text())
        if (folder / CAPTIONING_FILE).is_file():
            captioning[name] = json.loads((folder / CAPTIONING_FILE).read_text())
    checks = invariants(run_dir, stages, analyses)
    rows = summary_rows(analyses, captioning)
    statements = comparison(rows, analyses)
    report = {
        "invariants": checks,
        "all_invariants_pass": all(c["passed"] for c in checks),
        "table": rows,
        "comparison_with_paper": statements,
        "paper": PAPER,
        "timings_seconds": timings,
        **(extra or {}),
    }
    (run_dir / REPORT_JSON).write_text(json.dumps(report, indent=1))
    (run_dir / REPORT_HTML).write_text(_html(report, run_dir))
    return report


def _html(report: dict, run_dir: Path) -> str:
    css = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}.pass{color:#067d17;font-weight:bold}.fail{color:#c00;font-weight:bold}"
        "figure{display:inline-block;margin:.5em;max-width:520px}img{max-width:100%}figcaption{font-size:.85em;color:#555}"
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>moe-vlm reproduction</title><style>{css}</style></head><body>"
    ]
    parts.append("<h1>moe-vlm reproduction (embedded default)</h1>")
    n_pass = sum(c["passed"] for c in report["invariants"])
    parts.append(
        f"<h2>Invariants: {n_pass}/{len(report['invariants'])} pass</h2><table><tr><th>invariant</th><th>result</th><th>detail</th></tr>"
    )
    for c in report["invariants"]:
        cls = "pass" if c["passed"] else "fail"
        parts.append(
            f"<tr><td>{html.escape(c['name'])}</td><td class='{cls}'>{'PASS' if c['passed'] else 'FAIL'}</td><td style='text-align:left'>{html.escape(c['detail'])}</td></tr>"
        )
    parts.append("</table>")
    parts.append("<h2>Results (shaped like the paper's Table 1 and Section 3)</h2>")
    parts.append(
        "<table><tr><th>model</th><th>B-4</th><th>M</th><th>R-L</th><th>C</th><th>binomial k/n</th><th>p</th><th>crossover</th><th>collapsed layers</th></tr>"
    )
    for r in report["table"]:
        k = (
            f"{r['binomial_k']}/{r['binomial_n']} (layer {r['layer']})"
            if r["binomial_k"] is not None
            else "–"
        )
        cross = f"{r['crossover_pct']:+.1f}%" if r["crossover_pct"] is not None else "–"
        coll = f"{r['collapsed']}/{r['n_layers']}" if r["collapsed"] is not None else "–"
        parts.append(
            f"<tr><td>{r['model']}</td><td>{_fmt(r['Bleu_4'])}</td><td>{_fmt(r['METEOR'])}</td><td>{_fmt(r['ROUGE_L'])}</td>"
            f"<td>{_fmt(r['CIDEr'])}</td><td>{k}</td><td>{_fmt(r['binomial_p'])}</td><td>{cross}</td><td>{coll}</td></tr>"
        )
    parts.append(
        "</table><p>Captioning metrics ×100 (pycocoevalcap: PTB tokenizer, METEOR jar) on the Shapes test split; "
        "the paper's are on COCO Karpathy test (Stage 2: C 76.2, Stage 3: C 8.1) and are not comparable in absolute value.</p>"
    )
    parts.append(
        "<h2>Agreement with the paper</h2><table><tr><th>the paper</th><th>this run</th><th>agrees?</th></tr>"
    )
    for s in report["comparison_with_paper"]:
        verdict = {
            True: "<span class='pass'>agrees</span>",
            False: "<span class='fail'>disagrees</span>",
            None: "–",
        }[s["agrees"]]
        parts.append(
            f"<tr><td>{html.escape(s['paper'])}</td><td style='text-align:left'>{html.escape(s['measured'])}</td><td>{verdict}</td></tr>"
        )
    parts.append("</table>")
    parts.append("<h2>Figures</h2>")
    for name in ("stage2", "stage3", "dense"):
        for png in sorted((run_dir / "analysis" / name).glob("*.png")):
            parts.append(_img(png))
    parts.append("<h2>Time per stage</h2><table><tr><th>step</th><th>seconds</th></tr>")
    for step, seconds in report["timings_seconds"].items():
        parts.append(f"<tr><td>{html.escape(step)}</td><td>{seconds:.1f}</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)
