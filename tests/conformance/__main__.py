"""Command line of the conformance harness (run from the repository root):

    python -m tests.conformance calibrate [--force]   derive the calibrated list of the installed transformers
    python -m tests.conformance run [--mode MODE ...]  run it on MoeVlm (default: every router mode)

`run` derives the list first when the installed transformers has none (e.g. a newer transformers in CI). Exit code
1 when a calibrated test fails on MoeVlm.
"""

from __future__ import annotations

import argparse
import sys

from . import calibration, runner, sdist


def _calibrate(args) -> int:
    version = sdist.transformers_version()
    path = calibration.list_path(version)
    if path.exists() and not args.force:
        print(f"{path} exists ({len(calibration.read_names(path))} tests); --force re-derives it")
        return 0
    result = runner.calibrate(version)
    print(
        f"transformers {version}: Mistral passes {result.mistral_passed}, Mixtral passes {result.mixtral_passed}, "
        f"both {len(result.names)} ({result.seconds:.0f} s) -> {result.path}"
    )
    return 0


def _run(args) -> int:
    from modeling_moe_vlm import ROUTER_MODES

    modes = args.mode or list(ROUTER_MODES)
    unknown = set(modes) - set(ROUTER_MODES)
    if unknown:
        print(f"unknown router mode(s) {sorted(unknown)}; choose from {ROUTER_MODES}", file=sys.stderr)
        return 2
    reports = [runner.run_mode(mode) for mode in modes]
    for report in reports:
        print(report.summary(), flush=True)
    return 0 if all(report.ok for report in reports) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.conformance", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    calibrate = commands.add_parser(
        "calibrate", help="derive the calibrated list of the installed transformers"
    )
    calibrate.add_argument("--force", action="store_true", help="re-derive an existing list")
    calibrate.set_defaults(func=_calibrate)
    run = commands.add_parser("run", help="run the calibrated tests on MoeVlm")
    run.add_argument("--mode", action="append", help="router mode (repeatable; default: all)")
    run.set_defaults(func=_run)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (sdist.SdistUnavailable, runner.HarnessError) as error:
        print(f"conformance harness: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
