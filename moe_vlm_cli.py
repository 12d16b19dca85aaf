"""`moe-vlm`: one console script for the whole protocol.

Each package contributes its subcommands through a `cli.py` with `register(subparsers)`; this file only collects
them and dispatches. Heavy imports happen inside the command functions, so `moe-vlm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Packages that add subcommands, in the order `--help` lists them.
COMMAND_MODULES = (
    "trainer.cli",  # init, train
    "analysis.cli",  # analyze, evaluate, route
    "pipeline.cli",  # reproduce
    "hub.cli",  # publish
    "space.cli",  # demo
    "benchmarks.cli",  # bench
)


class UserError(Exception):
    """Bad input a person can fix: printed as one line, without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-vlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            # The command module (or its package) is absent: skip it. Anything else it imports is missing: raise.
            if not name.startswith(error.name or "\0"):
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # A command that takes free-form `--field value` pairs (`train`: every recipe field, which only transformers'
    # HfArgumentParser knows, imported when the command runs) says so with `set_defaults(extra_args=[])` and gets
    # them there; for any other command they are an error, exactly as `parse_args` reports it.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "extra_args"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra_args = extra
    try:
        args.func(args)
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError) as error:
        print(f"moe-vlm {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
