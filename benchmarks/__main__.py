"""`python -m benchmarks [--preset tiny|mid|all] [--repeats N] [--out DIR] [--quick] ...`: same as `moe-vlm bench`."""

from __future__ import annotations

import argparse
import sys

from moe_vlm_cli import UserError, tune_allocator

from .cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as `moe-vlm bench` runs: both entry points measure under the same allocator settings
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except (UserError, ValueError, FileNotFoundError) as error:
        print(f"python -m benchmarks: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
