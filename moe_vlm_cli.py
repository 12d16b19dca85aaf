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
    "trainer.cli",  # init, train, merge, plan
    "analysis.cli",  # analyze, evaluate, route
    "pipeline.cli",  # reproduce
    "hub.cli",  # publish
    "space.cli",  # demo
    "benchmarks.cli",  # bench
)


# glibc's malloc gives every allocation above a moving threshold its own mmap and returns freed memory at the top of
# the heap to the kernel, so a training step that allocates and frees the same activations every step page-faults
# them in again each time. Measured on the tiny Stage 1 (`moe-vlm train --profile`, 2 cores): 81 -> 69 ms a step,
# system time 2.5 -> 0.65 s in 40 steps. The same setting as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ /
# MALLOC_TOP_PAD_ in the environment (the PyTorch CPU tuning guide's advice, without installing jemalloc); an
# explicit environment setting wins. mallopt parameters: glibc's malloc.h.
_MALLOPT = {
    "MALLOC_TRIM_THRESHOLD_": (-1, 1 << 31),
    "MALLOC_TOP_PAD_": (-2, 256 << 20),
    "MALLOC_MMAP_THRESHOLD_": (-3, 32 << 20),
}


def tune_allocator() -> bool:
    """Keep freed memory in the process (see `_MALLOPT`); True when glibc took the settings. Elsewhere (macOS, musl)
    a no-op."""
    import ctypes
    import os

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(
        bool(libc.mallopt(code, value)) for name, (code, value) in _MALLOPT.items() if name not in os.environ
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
    tune_allocator()
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
