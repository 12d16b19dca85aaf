"""`moe-vlm bench --runs N`: the same benchmark in N fresh processes, its ratios pooled over all of them.

Why: one run's bootstrap interval (`timing.ratio_interval`) resamples that run's rounds, so it says how firmly the
ratio is known *in that process*. On this shared 2-core machine the run-to-run spread is larger than that: six
25-round runs of the tiny block put the gumbel pair's median at 1.084-1.142, each run's interval narrower than
that spread (README, Benchmarks), as the load moves between runs and each process lays its memory out anew.
So a verdict on a target read from one run can flip with the next. Here every run's samples are pooled (per item
of the baseline, as runs calibrate different group sizes) and the interval is a two-level (cluster) bootstrap:
resample the runs, then the rounds within each resampled run, paired as in one run. scipy's `bootstrap` resamples
one level only, hence the loop written here.

Each run is a child `python -m benchmarks` with the parent's arguments and its own `--out DIR/run-K`; a run whose
`bench.json` is already there with the same command is reused, so an interrupted `--runs` resumes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from .report import _verdict as run_verdict
from .report import target_met, target_text

RESAMPLES = 2000


class RunFailed(RuntimeError):
    """A run of `--runs` exited with an error or wrote no report: the same command again resumes from it."""


def _samples(case: dict, baseline: dict) -> tuple[list[float], list[float]]:
    """A run's timed samples of a case and its baseline, both divided by the baseline's items: runs calibrate their
    group sizes apart, so only per item do they pool; one factor for both keeps each run's ratio the bench's own
    (per call, where a case and its baseline differ in items)."""
    scale = baseline["items"]
    return [t / scale for t in case["times_s"]], [t / scale for t in baseline["times_s"]]


def pooled_ratio(
    runs: Sequence[tuple[Sequence[float], Sequence[float]]],
    kind: str = "time",
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """median(case) / median(baseline) over every run's samples, and its `level` two-level bootstrap interval.

    runs: per run, (case samples, baseline samples), per baseline item; paired by round where the counts are equal (they
    were timed in the same rounds), resampled apart otherwise. kind "speed" inverts the ratio."""
    import numpy as np

    if len(runs) < 2:
        raise ValueError(f"pooling needs at least 2 runs, got {len(runs)}")
    arrays = [(np.asarray(c, dtype=float), np.asarray(b, dtype=float)) for c, b in runs]
    for c, b in arrays:
        if min(c.size, b.size) < 1:
            raise ValueError("every pooled run needs samples of both the case and its baseline")
    value = float(
        np.median(np.concatenate([c for c, _ in arrays])) / np.median(np.concatenate([b for _, b in arrays]))
    )
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for i in range(resamples):
        cases, bases = [], []
        for r in rng.integers(len(arrays), size=len(arrays)):  # the runs, with replacement
            c, b = arrays[r]
            rows = rng.integers(c.size, size=c.size)  # then the rounds within the run
            cases.append(c[rows])
            bases.append(b[rows] if b.size == c.size else b[rng.integers(b.size, size=b.size)])
        stats[i] = np.median(np.concatenate(cases)) / np.median(np.concatenate(bases))
    tail = 100 * (1 - level) / 2
    low, high = (float(q) for q in np.percentile(stats, [tail, 100 - tail]))
    if kind == "speed":
        return 1.0 / value, (1.0 / high, 1.0 / low)
    return value, (low, high)


def firmly(interval: Sequence[float], target: Sequence | None) -> bool | None:
    """True where the whole interval meets the target, False where none of it does, None where it straddles (or
    there is no target): whether the runs together settle the verdict."""
    if target is None:
        return None
    ends = {target_met(end, target) for end in interval}
    return ends.pop() if len(ends) == 1 else None


def pool_reports(reports: Sequence[dict]) -> dict:
    """Every comparison of the first report, pooled over the reports that measured it (both sides sampled)."""
    if len(reports) < 2:
        raise ValueError(f"pooling needs at least 2 bench reports, got {len(reports)}")
    commands = {r["command"] for r in reports}
    if len(commands) > 1:
        raise ValueError(
            f"the reports come from different commands ({sorted(commands)}): pool runs of one command"
        )
    presets = {}
    for name, preset in reports[0]["presets"].items():
        sections = []
        for index, section in enumerate(preset["sections"]):
            others = [r["presets"][name]["sections"][index] for r in reports if name in r["presets"]]
            comparisons = []
            for comp in section["comparisons"]:
                pairs, values = [], []
                for other in others:
                    case, base = other["cases"].get(comp["case"]), other["cases"].get(comp["baseline"])
                    if case and base and case["times_s"] and base["times_s"]:
                        pairs.append(_samples(case, base))
                        run = next(
                            (
                                c
                                for c in other["comparisons"]
                                if (c["case"], c["baseline"]) == (comp["case"], comp["baseline"])
                            ),
                            {},
                        )
                        values.append(run.get("value"))
                entry = {key: comp[key] for key in ("case", "baseline", "kind", "target")}
                entry.update(runs=len(pairs), run_values=values)
                if len(pairs) >= 2:
                    value, interval = pooled_ratio(pairs, comp["kind"])
                    entry.update(
                        value=value,
                        interval=list(interval),
                        met=target_met(value, comp["target"]),
                        firmly=firmly(interval, comp["target"]),
                    )
                else:
                    entry.update(value=None, interval=None, met=None, firmly=None)
                comparisons.append(entry)
            sections.append({"title": section["title"], "comparisons": comparisons})
        presets[name] = {"description": preset["description"], "sections": sections}
    return {
        "command": reports[0]["command"],
        "runs": len(reports),
        "machines": sorted({r["machine"]["cpu"] for r in reports}),
        "dates": [r["machine"]["date"] for r in reports],
        "presets": presets,
    }


def _verdict(comp: dict) -> str:
    """A run's verdict on the pooled ratio, and whether the interval settles it."""
    if comp["met"] is None:
        return ""
    return run_verdict(comp["met"]) + (", on the line" if comp["firmly"] is None else ", firmly")


def pooled_markdown(pooled: dict) -> str:
    lines = [
        "### moe-vlm benchmark, pooled",
        "",
        f"Command: `{pooled['command']} --runs {pooled['runs']}`: {pooled['runs']} runs in fresh processes on "
        f"{', '.join(pooled['machines'])} ({pooled['dates'][0]} to {pooled['dates'][-1]}). Ratio = median vs median of every run's samples per item; "
        "[95% interval] = two-level bootstrap (runs, then rounds within a run), so it holds the run-to-run spread; "
        "firmly = the whole interval meets (or misses) the target, on the line = the target is inside it.",
        "",
    ]
    for name, preset in pooled["presets"].items():
        lines += [f"#### preset `{name}` ({preset['description']})", ""]
        lines += [
            "| case | vs | pooled ratio [95% interval] | runs' ratios | target | |",
            "|---|---|---|---|---|---|",
        ]
        for section in preset["sections"]:
            for comp in section["comparisons"]:
                if comp["value"] is None:
                    value = f"fewer than 2 runs measured it ({comp['runs']})"
                else:
                    value = f"{comp['value']:.3f} [{comp['interval'][0]:.3f}–{comp['interval'][1]:.3f}]"
                measured = [v for v in comp["run_values"] if v is not None]
                spread = f"{min(measured):.3f}–{max(measured):.3f}" if measured else ""
                target = target_text(comp["target"], comp["kind"])
                lines.append(
                    f"| {comp['case']} | {comp['baseline']} | {value} | {spread} | {target} | {_verdict(comp)} |"
                )
        lines.append("")
    return "\n".join(lines)


def _read(path: Path) -> dict | None:
    """A finished run's report, or None where there is none (or a run cut off while writing it: it runs again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_pooled(
    runs: int,
    out_dir: str | Path,
    child_argv: list[str],
    command: str,
    run_child: Callable[[list[str]], int],
    log=print,
) -> dict:
    """Run the benchmark `runs` times, each in a fresh process (`run_child(argv)` returns its exit status), into
    out_dir/run-K; reuse a run whose bench.json holds `command`; pool them into out_dir/bench-pooled.json + .md."""
    if runs < 2:
        raise ValueError(f"--runs pools fresh processes: it needs at least 2, got {runs}")
    out = Path(out_dir)
    reports = []
    for k in range(1, runs + 1):
        run_dir = out / f"run-{k}"
        path = run_dir / "bench.json"
        report = _read(path)
        if report is not None and report.get("command") == command:
            log(f"run {k}/{runs}: reusing {path}")
        else:
            log(f"run {k}/{runs}: {command} --out {run_dir}")
            status = run_child([*child_argv, "--out", str(run_dir)])
            if status != 0:
                raise RunFailed(f"run {k} of {runs} exited with status {status} (its output is above)")
            report = _read(path)
            if report is None:
                raise RunFailed(f"run {k} of {runs} finished without writing {path}")
        reports.append(report)
    pooled = pool_reports(reports)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-pooled.json").write_text(json.dumps(pooled, indent=2))
    (out / "bench-pooled.md").write_text(pooled_markdown(pooled))
    return pooled
