"""`moe-vlm reproduce`: the whole protocol on the embedded default, then the report.

pretraining (tiny CLIP + tiny dense Mistral) -> Stage 0 (upcycle) -> Stage 1 (connector) -> Stage 2 (hard routing,
experts) -> Stage 3 (Gumbel routing, router + attention + experts, instructions) and the dense control (from
Stage 1); then `analyze` + `evaluate` on Stage 2, Stage 3 and the dense control; then `report.html` / `report.json`.

Each step runs through the same commands a user would type (`moe-vlm train ...`), so the reproduction exercises
the public interface. A step whose output is complete (its completion marker, or its JSON) is skipped: an
interrupted reproduction resumes where it stopped.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from configuration.contract import ANALYSIS_FILE, CAPTIONING_FILE, COMPLETION_MARKER, REPORT_HTML

# (name, train-stage, from) in protocol order.
TRAINING_STEPS = (
    ("pretrain", "pretrain", None),
    ("stage0", "0", "pretrain"),
    ("stage1", "1", "stage0"),
    ("stage2", "2", "stage1"),
    ("stage3", "3", "stage2"),
    ("dense", "dense", "stage1"),
)
ANALYSED = ("stage2", "stage3", "dense")


def _train(out: Path, name: str, stage: str, source: str | None, seed: int) -> None:
    from moe_vlm_cli import main

    # the training seed and the Shapes world's seed: the analyses read the same world (analysis.run.load_data)
    argv = [
        "train",
        "--stage",
        stage,
        "--out",
        str(out / name),
        "--seed",
        str(seed),
        "--shapes_seed",
        str(seed),
    ]
    if source is not None:
        argv += ["--from", str(out / source)]
    if main(argv) != 0:
        raise RuntimeError(f"`moe-vlm {' '.join(argv)}` failed (see the message above)")


def reproduce(out: str | Path, seed: int = 0, n_samples: int = 200, n_eval: int = 100) -> dict:
    """Run every step not yet complete under `out`, then write the report. Returns the report dict."""
    from analysis.run import analyze, evaluate

    from .report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    started = time.time()

    def timed(step: str, func, done: bool) -> None:
        if done:
            print(f"[reproduce] {step}: already complete, skipped")
            return
        print(f"[reproduce] {step} ...", flush=True)
        t0 = time.time()
        func()
        timings[step] = round(time.time() - t0, 1)
        timings_file.write_text(json.dumps(timings, indent=1))

    for name, stage, source in TRAINING_STEPS:
        marker = out / name / COMPLETION_MARKER
        timed(f"train {name}", lambda n=name, s=stage, f=source: _train(out, n, s, f, seed), marker.is_file())

    for name in ANALYSED:
        folder = out / "analysis" / name
        timed(
            f"analyze {name}",
            lambda n=name, d=folder: analyze(
                out / n, d, init_dir=out / "stage0", seed=seed, n_samples=n_samples
            ),
            (folder / ANALYSIS_FILE).is_file(),
        )
        timed(
            f"evaluate {name}",
            lambda n=name, d=folder: evaluate(out / n, d, seed=seed, n_samples=n_eval),
            (folder / CAPTIONING_FILE).is_file(),
        )

    this_run = round(time.time() - started, 1)
    extra = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "seed": seed,
        "seconds_this_invocation": this_run,
        "seconds_all_steps": round(sum(timings.values()), 1),
    }
    report = write_report(out, timings, extra)
    _print_summary(out, report, timings)
    return report


def _print_summary(out: Path, report: dict, timings: dict) -> None:
    n_pass = sum(c["passed"] for c in report["invariants"])
    print(f"\ninvariants: {n_pass}/{len(report['invariants'])} pass")
    for check in report["invariants"]:
        print(f"  [{'PASS' if check['passed'] else 'FAIL'}] {check['name']}")
    print("\nagreement with the paper:")
    for s in report["comparison_with_paper"]:
        verdict = {True: "agrees", False: "disagrees", None: "n/a"}[s["agrees"]]
        print(f"  {verdict:>9}: {s['paper']} | here: {s['measured']}")
    print("\ntime per step (s):")
    for step, seconds in timings.items():
        print(f"  {step:<20} {seconds:7.1f}")
    print(f"  {'total':<20} {sum(timings.values()):7.1f}")
    print(f"\nreport: {out / REPORT_HTML}")
