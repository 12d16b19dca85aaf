"""`moe-vlm reproduce`: the whole protocol on the embedded default, then the report; for one seed or several.

pretraining (tiny CLIP + tiny dense Mistral) -> Stage 0 (upcycle) -> Stage 1 (connector + attention) -> Stage 2
(hard routing, experts) -> Stage 3 (Gumbel routing, router + attention + experts, instructions) and the dense control
(from Stage 1); then `analyze` + `evaluate` on Stage 2, Stage 3 and the dense control; then `report.html` /
`report.json`.

Each step runs through the same commands a user would type (`moe-vlm train ...`), so the reproduction exercises
the public interface. A step whose output is complete (its completion marker, or its JSON) is skipped: an
interrupted reproduction resumes where it stopped.

Pretraining is the frozen backbone (CLIP and Mistral at paper scale): its seed and Shapes world are fixed by its
recipe, it is built once per recipe in the shared cache (`pipeline.pretrain_cache`) and a run's `pretrain` entry is a
symlink to it (`--no-cache`: built inside the output folder instead). A run keeps the pretraining it started with:
its later steps were trained on it.

Layout: one seed (`--seed N`, or `--seeds N`) writes the run straight into `--out`, as it always has. Several seeds
(`--seeds 0 1 2`) write each seed's run, with its own report, into `<out>/seed<N>/`, then the report across seeds
(`pipeline.seeds`: means with 95 % intervals, verdicts per seed and overall) into `<out>/report.json` / `.html`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from configuration.atomic import write_atomic
from configuration.cli_inputs import check_out_dir
from configuration.contract import (
    ANALYSIS_FILE,
    CAPTIONING_FILE,
    COMPLETION_MARKER,
    REPORT_HTML,
    REPORT_JSON,
    cache_root,
)

from . import pretrain_cache
from .provenance import provenance
from .seeds import seed_dir_name, seed_verdict, write_aggregate_report

# A run's pretraining entry: a symlink to the cached folder (with --no-cache, to or being `<out>/pretrain`).
PRETRAIN = "pretrain"
TIMINGS_FILE = "timings.json"
# (name, train-stage, from) in protocol order, after pretraining.
TRAINING_STEPS = (
    ("stage0", "0", PRETRAIN),
    ("stage1", "1", "stage0"),
    ("stage2", "2", "stage1"),
    ("stage3", "3", "stage2"),
    ("dense", "dense", "stage1"),
)
ANALYSED = ("stage2", "stage3", "dense")


def _train(
    out_dir: Path, stage: str, source: Path | None, seed: int | None, extra: Sequence[str] = ()
) -> None:
    """`moe-vlm train --stage STAGE --out OUT_DIR [--from SOURCE] [--seed/--shapes_seed SEED] [EXTRA...]`.

    `seed` is both the training seed and the Shapes world's (the analyses read the same world,
    `analysis.run.load_data`); None keeps the recipe's (pretraining: fixed, shared by every seed)."""
    from moe_vlm_cli import main

    argv = ["train", "--stage", stage, "--out", str(out_dir)]
    if seed is not None:
        argv += ["--seed", str(seed), "--shapes_seed", str(seed)]
    if source is not None:
        argv += ["--from", str(source)]
    argv += list(extra)
    if main(argv) != 0:
        raise RuntimeError(f"`moe-vlm {' '.join(argv)}` failed (see the message above)")


def _train_pretraining(build_dir: Path, resume: bool) -> None:
    _train(build_dir, "pretrain", None, None, ["--resume_from_checkpoint", "true"] if resume else [])


class Pretraining:
    """The pretrained backbone the runs of one invocation share: found or built on first use, then linked into each
    run folder as `<run>/pretrain`.

    `cache`: the shared cache (`cache_root()/pretrain/<key>`); else `<root>/pretrain` inside the output folder.
    `rebuild`: train it again even where a finished copy exists (once per invocation)."""

    def __init__(self, root: Path, *, cache: bool = True, rebuild: bool = False):
        self.root, self.cache, self.rebuild = Path(root), cache, rebuild
        self.seconds: float | None = None  # time spent building it in this invocation, if it was built
        self._target: Path | None = None

    def target(self) -> Path:
        if self._target is None:
            t0 = time.time()
            if self.cache:
                target, key, built = pretrain_cache.ensure_cached(_train_pretraining, rebuild=self.rebuild)
                where = f"the cache ({key})"
            else:
                target = self.root / PRETRAIN
                inputs = (
                    pretrain_cache.recipe_inputs()
                )  # recorded in the folder, as a cached build records it
                built = pretrain_cache.build(target, _train_pretraining, rebuild=self.rebuild, inputs=inputs)
                where = "the output folder (--no-cache)"
            if built:
                self.seconds = round(time.time() - t0, 1)
                print(f"[reproduce] pretraining built in {where}: {target} ({self.seconds} s)", flush=True)
            else:
                print(f"[reproduce] pretraining: found in {where}: {target}, skipped", flush=True)
            self._target = target
        return self._target

    def attach(self, run_dir: Path) -> dict:
        """Give `run_dir` its `pretrain` entry; returns where it points (`dir`), the `key` it was built under (None
        for a folder from before keys were recorded) and whether it lies in the shared cache (`cached`)."""
        entry = run_dir / PRETRAIN
        if pretrain_cache.is_complete(entry) and not self.rebuild:
            # The run keeps the backbone it started with: its finished stages were trained on it.
            current = pretrain_cache.cached_dir(pretrain_cache.current_key()) if self.cache else None
            if current is not None and entry.resolve() != current.resolve():
                print(
                    f"[reproduce] note: {entry} is the pretraining this run started with ({entry.resolve()}), not the "
                    f"current recipe's ({current}); its later steps were trained on it. Use a new --out (or delete "
                    "this one) to run on the current pretraining.",
                    flush=True,
                )
        else:
            target = self.target()
            if (run_dir / "stage0" / COMPLETION_MARKER).is_file() and (
                self.rebuild or entry.resolve() != target.resolve()
            ):
                print(
                    f"[reproduce] warning: {run_dir} already has finished stages trained on another pretraining; "
                    f"they are kept (delete them to retrain on {target})",
                    flush=True,
                )
            pretrain_cache.link(entry, target, relative=not self.cache)
        resolved = entry.resolve()
        inputs = resolved / pretrain_cache.INPUTS_FILE
        key = json.loads(inputs.read_text()).get("key") if inputs.is_file() else None
        cached = (cache_root() / pretrain_cache.CACHE_SUBDIR).resolve() in resolved.parents
        return {"dir": str(resolved), "key": key, "cached": cached}


def _check_layout(out: Path, multi: bool) -> None:
    """One output folder holds one layout: refuse a single-seed run over a multi-seed folder and the reverse (and
    an `--out` that is no folder, before anything trains)."""
    check_out_dir(out)
    if multi and any((out / name / COMPLETION_MARKER).is_file() for name, *_ in TRAINING_STEPS):
        raise ValueError(
            f"{out} holds a single-seed run (its stages are at the top); give several seeds another --out"
        )
    if not multi and any(out.glob("seed*/stage0")):
        raise ValueError(f"{out} holds a multi-seed run (seed*/ folders); give a single seed another --out")


def run_seed(
    run_dir: Path,
    seed: int,
    pretraining: Pretraining,
    n_samples: int = 200,
    n_eval: int = 100,
    *,
    own_pretraining: bool = True,
) -> dict:
    """One seed's protocol into `run_dir` (every step not yet complete), then its report. Returns the report dict.

    `own_pretraining`: a pretraining built in this invocation counts among this run's step times (one seed); with
    several seeds it is shared, and the report across seeds counts it once."""
    from analysis.run import analyze, evaluate

    from .report import write_report

    run_dir.mkdir(parents=True, exist_ok=True)
    timings_file = run_dir / TIMINGS_FILE
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    started = time.time()

    def timed(step: str, func, done: bool) -> None:
        if done:
            print(f"[reproduce] seed {seed}: {step}: already complete, skipped")
            return
        print(f"[reproduce] seed {seed}: {step} ...", flush=True)
        t0 = time.time()
        func()
        timings[step] = round(time.time() - t0, 1)
        write_atomic(timings_file, json.dumps(timings, indent=1))

    pretrain_info = pretraining.attach(run_dir)
    if own_pretraining and pretraining.seconds is not None:
        timings[f"train {PRETRAIN}"] = pretraining.seconds
        write_atomic(timings_file, json.dumps(timings, indent=1))
    for name, stage, source in TRAINING_STEPS:
        timed(
            f"train {name}",
            lambda n=name, s=stage, f=source: _train(run_dir / n, s, run_dir / f, seed),
            (run_dir / name / COMPLETION_MARKER).is_file(),
        )

    for name in ANALYSED:
        folder = run_dir / "analysis" / name
        timed(
            f"analyze {name}",
            lambda n=name, d=folder: analyze(
                run_dir / n, d, init_dir=run_dir / "stage0", seed=seed, n_samples=n_samples
            ),
            (folder / ANALYSIS_FILE).is_file(),
        )
        timed(
            f"evaluate {name}",
            lambda n=name, d=folder: evaluate(run_dir / n, d, seed=seed, n_samples=n_eval),
            (folder / CAPTIONING_FILE).is_file(),
        )

    this_run = round(time.time() - started, 1)
    extra = {
        **provenance(),  # machine and package versions
        "seed": seed,
        "pretraining": pretrain_info,
        "seconds_this_invocation": this_run,
        "seconds_all_steps": round(sum(timings.values()), 1),
    }
    report = write_report(run_dir, timings, extra)
    _print_summary(run_dir, report, timings)
    return report


def reproduce(
    out: str | Path,
    seed: int = 0,
    n_samples: int = 200,
    n_eval: int = 100,
    *,
    cache: bool = True,
    rebuild_pretraining: bool = False,
) -> dict:
    """One seed: every step not yet complete under `out`, then `out/report.json`. Returns the report dict."""
    out = Path(out)
    _check_layout(out, multi=False)
    pretraining = Pretraining(out, cache=cache, rebuild=rebuild_pretraining)
    return run_seed(out, seed, pretraining, n_samples, n_eval)


def reproduce_seeds(
    out: str | Path,
    seeds: Sequence[int],
    n_samples: int = 200,
    n_eval: int = 100,
    *,
    cache: bool = True,
    rebuild_pretraining: bool = False,
) -> dict:
    """Every seed's protocol into `out/seed<N>/` (one seed: straight into `out`, as `reproduce`), then the report
    across seeds in `out`. One pretraining serves all seeds. Returns the aggregate report dict."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("--seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed: {seeds}")
    if len(seeds) == 1:
        return reproduce(
            out, seeds[0], n_samples, n_eval, cache=cache, rebuild_pretraining=rebuild_pretraining
        )
    out = Path(out)
    _check_layout(out, multi=True)
    out.mkdir(parents=True, exist_ok=True)
    timings_file = out / TIMINGS_FILE
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    started = time.time()
    pretraining = Pretraining(out, cache=cache, rebuild=rebuild_pretraining)
    reports = {}
    for seed in seeds:
        reports[seed] = run_seed(
            out / seed_dir_name(seed), seed, pretraining, n_samples, n_eval, own_pretraining=False
        )
        if pretraining.seconds is not None:
            timings[f"train {PRETRAIN} (shared)"] = pretraining.seconds
        timings[seed_dir_name(seed)] = reports[seed].get("seconds_all_steps")
        write_atomic(timings_file, json.dumps(timings, indent=1))
    extra = {
        **provenance(),  # machine and package versions
        "pretraining": reports[seeds[0]].get("pretraining"),
        "timings_seconds": timings,
        "seconds_this_invocation": round(time.time() - started, 1),
        "seconds_all_steps": round(sum(v for v in timings.values() if v is not None), 1),
    }
    report = write_aggregate_report(out, reports, extra)
    _print_aggregate_summary(out, report)
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


_SHORT_VERDICT = {"agrees": "+", "disagrees": "-", "n/a": "n/a", "n/a (precondition)": "n/a", "absent": "?"}


def _print_aggregate_summary(out: Path, report: dict) -> None:
    seeds = [str(s) for s in report["seeds"]]
    counts = report["invariants"]["per_seed"]
    print(f"\n===== {len(seeds)} seeds ({', '.join(seeds)}) =====")
    print("invariants: " + ", ".join(f"seed {s} {counts[s]['passed']}/{counts[s]['total']}" for s in seeds))
    print("\nheadline (mean [95 % interval] over seeds):")
    for name, h in report["headline"].items():
        interval = f"[{h['low']:.4g}, {h['high']:.4g}]" if h["low"] is not None else "(no interval)"
        mean = f"{h['mean']:.4g}" if h["mean"] is not None else "–"
        print(f"  {name:<40} {mean:>10} {interval}  n={h['n']}")
    print("\nagreement with the paper (overall, per seed):")
    for c in report["comparison_with_paper"]:
        per_seed = " ".join(_SHORT_VERDICT[seed_verdict(e)] for e in c["per_seed"].values())
        print(f"  {c['verdict']:>9} [{per_seed}]: {c['paper']}")
    print(f"\nreport: {out / REPORT_HTML} ({out / REPORT_JSON}); per seed: {out}/seed<N>/{REPORT_HTML}")


__all__ = [
    "ANALYSED",
    "PRETRAIN",
    "TRAINING_STEPS",
    "Pretraining",
    "reproduce",
    "reproduce_seeds",
    "run_seed",
]
