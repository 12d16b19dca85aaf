"""`moe-vlm bench` (also `python -m benchmarks`): MoE vs dense speed and memory, side by side, in one process."""

from __future__ import annotations

import argparse
import shlex
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", default="all", choices=["tiny", "mid", "all"], help="model size (default: all)"
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed rounds per case (default: tiny 7, mid 3; --quick 2)"
    )
    p.add_argument(
        "--out", default="runs/bench", help="folder for bench.json and bench.md (default: runs/bench)"
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny preset, 2 rounds: a smoke run well under a minute"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: bf16, MFU, torch.compile")
    p.add_argument(
        "--kernel",
        default="model",
        # "model", "auto" and benchmarks.cases.KERNELS, spelled out: importing the cases would import torch for --help
        choices=["model", "auto", "eager", "grouped_mm", "sorted_top1", "sorted_top1_cpp"],
        help="experts kernel of the MoE model (model: its default; auto: the faster one in the block benchmark)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time torch.compile'd models (default: on for cuda, off for cpu)",
    )
    p.add_argument(
        "--sections",
        nargs="+",
        default=None,
        help="only these sections: block train generation analysis trainer utilisation (default: all of the "
        "preset's; --quick leaves out utilisation, a short run of every reproduction step, unless named)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)"
    )
    p.add_argument(
        "--runs",
        type=int,
        default=1,
        help="run it this many times, each in a fresh process, into OUT/run-K, and pool the ratios over the runs "
        "into OUT/bench-pooled.json and .md (an interval that holds the run-to-run spread; a finished run is "
        "reused on a rerun). Default 1: one run, OUT/bench.json",
    )


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces one run (as `moe-vlm bench`), for the report."""
    return shlex.join(["moe-vlm", "bench", *_arguments(args)])


def _arguments(args: argparse.Namespace) -> list[str]:
    """The arguments of one run, `--out` and `--runs` left out: what `--runs` hands each fresh process."""
    parts = ["--quick"] if args.quick else ["--preset", args.preset]
    for flag, value, default in (
        ("--repeats", args.repeats, None),
        ("--device", args.device, "cpu"),
        ("--kernel", args.kernel, "model"),
        ("--threads", args.threads, 1),
    ):
        if value != default:
            parts += [flag, str(value)]
    if args.compile is not None:
        parts.append("--compile" if args.compile else "--no-compile")
    if args.sections:
        parts += ["--sections", *args.sections]
    return parts


def _run_child(argv: list[str]) -> int:
    """One run in a fresh process (`python -m benchmarks`, the same allocator settings); its exit status. Its
    table goes to stderr with its progress: stdout is left to the pooled table."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "benchmarks", *argv], stdout=sys.stderr).returncode


def _pooled(args: argparse.Namespace) -> None:
    from moe_vlm_cli import UserError

    from .pool import RunFailed, pooled_markdown, run_pooled

    try:
        pooled = run_pooled(
            args.runs,
            args.out,
            _arguments(args),
            _command(args),
            _run_child,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    # a run failed: it printed its own error above; the same command again resumes after the last good run
    except RunFailed as error:
        raise UserError(f"{error}; rerun the same command to resume") from error
    print(pooled_markdown(pooled))
    print(f"wrote {args.out}/bench-pooled.json and {args.out}/bench-pooled.md", file=sys.stderr)


def run(args: argparse.Namespace) -> None:
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.runs < 1:
        raise ValueError(f"--runs must be >= 1, got {args.runs}")
    from configuration.cli_inputs import check_out_dir

    check_out_dir(args.out)  # before measuring: a file there would lose the whole run's results at the end
    if args.runs > 1:  # the runs measure in their own processes: this one imports neither torch nor the cases
        return _pooled(args)
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # the analysis pipeline's progress bars would flood the output
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from .report import to_markdown
    from .run import run_benchmarks

    torch.set_num_threads(args.threads)
    presets = ["tiny", "mid"] if args.preset == "all" else [args.preset]
    repeats = args.repeats
    if args.quick:
        presets, repeats = ["tiny"], repeats or 2
    report = run_benchmarks(
        presets,
        args.out,
        repeats=repeats,
        device=args.device,
        kernel=args.kernel,
        compile=args.compile,
        quick=args.quick,
        sections=args.sections,
        command=_command(args),
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(to_markdown(report))
    print(f"wrote {args.out}/bench.json and {args.out}/bench.md", file=sys.stderr)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="MoE vs dense: training step, block, generation, analysis; speed + memory"
    )
    add_arguments(p)
    p.set_defaults(func=run)
