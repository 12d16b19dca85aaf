"""Several seeds of the reproduction, condensed: every headline number as a mean with a 95 % interval across seeds,
every comparison with the paper judged per seed and overall, every invariant counted per seed.

What a seed varies: the Shapes world (its images, captions and splits) and the training of Stages 1-3 and the dense
control (initialisation of what they train, data order, Gumbel noise), and the analyses' sampling. What it does not:
the pretrained backbone (tiny CLIP + tiny Mistral), which stands for the frozen CLIP / Mistral of paper scale, is
trained once with the seed its recipe fixes and shared by all seeds (`pipeline.pretrain_cache`). So the interval is
the spread of the protocol *given* one backbone, as the paper's would be given its one CLIP and Mistral.

The interval is Student's t interval for the mean of the per-seed values: mean ± t(0.975, n - 1) · s / √n, with s
the sample standard deviation (n - 1 in the denominator), computed by `scipy.stats.t.interval`. It treats the seeds
as independent draws; with 3 seeds t(0.975, 2) = 4.30, so it is wide, as it should be. One seed: no interval.

The overall verdict on a claim of the paper (`VERDICT_RULE`): n/a unless every seed's report judged the claim with
its precondition met; then "agrees" if every seed agrees, "disagrees" if every seed disagrees, and "mixed" (which
counts as not agreeing: `agrees` False) when the seeds split.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from configuration.contract import REPORT_HTML, REPORT_JSON

from .provenance import provenance_html

CONFIDENCE = 0.95
INTERVAL_METHOD = (
    "Student t interval for the mean across seeds: mean ± t(0.975, n-1)·s/√n, s the sample standard deviation "
    "(ddof=1), scipy.stats.t.interval; none for n = 1"
)
VERDICT_RULE = (
    "n/a unless every seed judged the claim with its precondition met; agrees if every seed agrees, disagrees if "
    "every seed disagrees, mixed (= does not agree) when they split"
)


def seed_dir_name(seed: int) -> str:
    """A seed's run folder inside a multi-seed output folder: `seed<N>`."""
    return f"seed{seed}"


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Mean, sample standard deviation and the Student t interval of `values` (finite numbers, one per seed)."""
    a = np.asarray(values, dtype=float)  # (n_seeds,)
    n = int(a.size)
    if n == 0:
        return {"mean": None, "std": None, "low": None, "high": None, "half_width": None, "n": 0}
    mean = float(a.mean())
    if n == 1:
        return {"mean": mean, "std": None, "low": None, "high": None, "half_width": None, "n": 1}
    std = float(a.std(ddof=1))
    sem = float(stats.sem(a))
    if sem == 0.0:  # every seed equal: scipy returns nan for a zero scale; the interval is the point
        low = high = mean
    else:
        low, high = (float(x) for x in stats.t.interval(confidence, df=n - 1, loc=mean, scale=sem))
    return {"mean": mean, "std": std, "low": low, "high": high, "half_width": (high - low) / 2, "n": n}


def _number(value) -> float | None:
    """A headline value as a float, or None where it is missing or not a finite number."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def aggregate_headline(reports: Mapping[int, dict], confidence: float = CONFIDENCE) -> dict:
    """{metric: interval(...) + `per_seed` {seed: value}} for every key of any seed's `headline`; the interval is
    over the seeds where the value is a finite number (`n` says how many)."""
    names = list(dict.fromkeys(k for r in reports.values() for k in (r.get("headline") or {})))
    out = {}
    for name in names:
        per_seed = {str(s): _number((r.get("headline") or {}).get(name)) for s, r in reports.items()}
        values = [v for v in per_seed.values() if v is not None]
        out[name] = {**interval(values, confidence), "per_seed": per_seed}
    return out


def _verdict(per_seed: Mapping[str, dict | None]) -> tuple[str, bool | None]:
    judged = [
        e for e in per_seed.values() if e is not None and e["precondition_met"] and e["agrees"] is not None
    ]
    if len(judged) < len(per_seed):
        return "n/a", None
    votes = {e["agrees"] for e in judged}
    if votes == {True}:
        return "agrees", True
    if votes == {False}:
        return "disagrees", False
    return "mixed", False


def aggregate_comparisons(reports: Mapping[int, dict]) -> list[dict]:
    """One entry per claim of the paper (matched by its `paper` text across seeds, in first-seen order): the claim,
    its precondition, each seed's verdict (`None` where the seed's report lacks the claim) and the overall verdict."""
    claims: dict[str, dict] = {}
    for r in reports.values():
        for entry in r.get("comparison_with_paper") or []:
            claims.setdefault(
                entry["paper"], {"paper": entry["paper"], "precondition": entry.get("precondition")}
            )
    out = []
    for claim, head in claims.items():
        per_seed = {}
        for seed, r in reports.items():
            entry = next((e for e in r.get("comparison_with_paper") or [] if e["paper"] == claim), None)
            per_seed[str(seed)] = (
                None
                if entry is None
                else {
                    "agrees": entry.get("agrees"),
                    # a report from before preconditions existed: a judged claim had its precondition met
                    "precondition_met": bool(entry.get("precondition_met", True)),
                    "measured": entry.get("measured"),
                }
            )
        verdict, agrees = _verdict(per_seed)
        counts = {
            "agree": sum(1 for e in per_seed.values() if e and e["precondition_met"] and e["agrees"] is True),
            "disagree": sum(
                1 for e in per_seed.values() if e and e["precondition_met"] and e["agrees"] is False
            ),
            "precondition_failed": sum(1 for e in per_seed.values() if e and not e["precondition_met"]),
            "missing": sum(1 for e in per_seed.values() if e is None),
        }
        out.append(
            {**head, "verdict": verdict, "agrees": agrees, "seed_counts": counts, "per_seed": per_seed}
        )
    return out


def aggregate_invariants(reports: Mapping[int, dict]) -> dict:
    """Pass counts per seed, and per invariant (by name) which seeds passed it."""
    per_seed = {
        str(s): {
            "passed": sum(bool(c["passed"]) for c in r.get("invariants", [])),
            "total": len(r.get("invariants", [])),
        }
        for s, r in reports.items()
    }
    names = list(dict.fromkeys(c["name"] for r in reports.values() for c in r.get("invariants", [])))
    checks = []
    for name in names:
        results = {}
        for seed, r in reports.items():
            check = next((c for c in r.get("invariants", []) if c["name"] == name), None)
            results[str(seed)] = None if check is None else bool(check["passed"])
        checks.append(
            {"name": name, "passed_seeds": sum(v is True for v in results.values()), "per_seed": results}
        )
    return {"per_seed": per_seed, "checks": checks}


def aggregate(reports: Mapping[int, dict], confidence: float = CONFIDENCE) -> dict:
    """The multi-seed report (without I/O): `seeds`, `headline`, `comparison_with_paper`, `invariants`,
    `all_invariants_pass` (every invariant of every seed), and how the interval and verdicts are computed."""
    reports = dict(sorted(reports.items()))
    invariants = aggregate_invariants(reports)
    return {
        "seeds": list(reports),
        "n_seeds": len(reports),
        "interval": {"confidence": confidence, "method": INTERVAL_METHOD},
        "verdict_rule": VERDICT_RULE,
        "headline": aggregate_headline(reports, confidence),
        "comparison_with_paper": aggregate_comparisons(reports),
        "invariants": invariants,
        "all_invariants_pass": all(v["passed"] == v["total"] for v in invariants["per_seed"].values()),
        "seed_reports": {str(s): f"{seed_dir_name(s)}/{REPORT_HTML}" for s in reports},
    }


def write_aggregate_report(out: str | Path, reports: Mapping[int, dict], extra: dict | None = None) -> dict:
    """Write `out/report.json` and a self-contained `out/report.html` for the seeds' reports; returns the dict."""
    out = Path(out)
    report = {**aggregate(reports), **(extra or {})}
    (out / REPORT_JSON).write_text(json.dumps(report, indent=1))
    (out / REPORT_HTML).write_text(_html(report))
    return report


# ----- HTML ----------------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


_VERDICT_HTML = {
    "agrees": "<span class='pass'>agrees</span>",
    "disagrees": "<span class='fail'>disagrees</span>",
    "mixed": "<span class='fail'>mixed</span>",
    "n/a": "n/a",
}


def seed_verdict(entry: dict | None) -> str:
    """One seed's verdict on a claim, in words: agrees / disagrees / n/a (precondition) / n/a / absent."""
    if entry is None:
        return "absent"
    if not entry["precondition_met"]:
        return "n/a (precondition)"
    return {True: "agrees", False: "disagrees", None: "n/a"}[entry["agrees"]]


def _html(report: dict) -> str:
    seeds = [str(s) for s in report["seeds"]]
    css = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}.pass{color:#067d17;font-weight:bold}"
        ".fail{color:#c00;font-weight:bold}.small{font-size:.85em;color:#555;text-align:left}"
    )
    seed_heads = "".join(f"<th>seed {html.escape(s)}</th>" for s in seeds)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>moe-vlm reproduction, {len(seeds)} seeds</title>"
        f"<style>{css}</style></head><body>",
        f"<h1>moe-vlm reproduction (embedded default), seeds {', '.join(seeds)}</h1>",
        "<p>Each seed's own report: "
        + ", ".join(
            f"<a href='{html.escape(report['seed_reports'][s])}'>seed {html.escape(s)}</a>" for s in seeds
        )
        + ". Seeds vary the Shapes world and Stages 1–3 (and the dense control); the pretrained backbone (tiny CLIP "
        "and Mistral, the frozen parts) is trained once, with its recipe's seed, and shared.</p>",
    ]

    inv = report["invariants"]
    counts = ", ".join(
        f"seed {html.escape(s)}: {inv['per_seed'][s]['passed']}/{inv['per_seed'][s]['total']}" for s in seeds
    )
    parts.append(f"<h2>Invariants ({counts} pass)</h2><table><tr><th>invariant</th>{seed_heads}</tr>")
    for check in inv["checks"]:
        cells = "".join(
            "<td>–</td>"
            if check["per_seed"][s] is None
            else f"<td class='{'pass' if check['per_seed'][s] else 'fail'}'>{'PASS' if check['per_seed'][s] else 'FAIL'}</td>"
            for s in seeds
        )
        parts.append(f"<tr><td>{html.escape(check['name'])}</td>{cells}</tr>")
    parts.append("</table>")

    conf = int(round(report["interval"]["confidence"] * 100))
    parts.append(
        f"<h2>Headline numbers</h2><table><tr><th>metric</th><th>mean</th><th>{conf} % interval</th><th>n</th>"
        f"{seed_heads}</tr>"
    )
    for name, h in report["headline"].items():
        ci = f"[{_fmt(h['low'])}, {_fmt(h['high'])}]" if h["low"] is not None else "–"
        cells = "".join(f"<td>{_fmt(h['per_seed'].get(s))}</td>" for s in seeds)
        parts.append(
            f"<tr><td>{html.escape(name)}</td><td>{_fmt(h['mean'])}</td><td>{ci}</td><td>{h['n']}</td>{cells}</tr>"
        )
    parts.append(f"</table><p class='small'>Interval: {html.escape(report['interval']['method'])}.</p>")

    parts.append(
        f"<h2>Agreement with the paper</h2><table><tr><th>the paper</th><th>precondition</th>{seed_heads}"
        "<th>overall</th></tr>"
    )
    for c in report["comparison_with_paper"]:
        cells = "".join(
            f"<td style='text-align:left'>{html.escape(seed_verdict(c['per_seed'][s]))}"
            + (
                f"<br><span class='small'>{html.escape(str(c['per_seed'][s]['measured']))}</span>"
                if c["per_seed"][s] and c["per_seed"][s].get("measured") is not None
                else ""
            )
            + "</td>"
            for s in seeds
        )
        parts.append(
            f"<tr><td>{html.escape(c['paper'])}</td><td class='small'>{_fmt(c.get('precondition'))}</td>{cells}"
            f"<td>{_VERDICT_HTML[c['verdict']]}</td></tr>"
        )
    parts.append(f"</table><p class='small'>Overall verdict: {html.escape(report['verdict_rule'])}.</p>")

    timings = report.get("timings_seconds") or {}
    if timings:
        parts.append("<h2>Time</h2><table><tr><th>part</th><th>seconds</th></tr>")
        for part, seconds in timings.items():
            parts.append(f"<tr><td>{html.escape(part)}</td><td>{_fmt(seconds)}</td></tr>")
        parts.append("</table>")
    parts.append(provenance_html(report))
    parts.append("</body></html>")
    return "\n".join(parts)


__all__ = [
    "CONFIDENCE",
    "INTERVAL_METHOD",
    "VERDICT_RULE",
    "aggregate",
    "aggregate_comparisons",
    "aggregate_headline",
    "aggregate_invariants",
    "interval",
    "seed_dir_name",
    "seed_verdict",
    "write_aggregate_report",
]
