"""What a command is told on its command line, checked before any work: the output folder and the counts.

A bad `--out` found late costs the work done before it: `mkdir` raises FileExistsError after a model was built or
a benchmark measured (and the benchmark's results were lost), and a stage trained into a folder that holds a
finished stage replaced that stage without a word. A negative count slips through argparse's `type=int` and
selects nothing (`--n-samples -3`: an empty probe set, an error minutes later that names no flag). So the commands
call these first. Dependency-free, like `configuration.contract`: the parsers import it without importing torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .contract import COMPLETION_MARKER


def check_out_dir(path: str | Path, flag: str = "--out", *, refuse_finished: bool = False) -> Path:
    """`path` as a folder to write into: refused (ValueError naming `flag`) when it, or a folder above it, exists as
    something other than a folder; with `refuse_finished`, also when it already holds a finished stage (its
    completion marker), which writing into it would replace. Returns the path."""
    path = Path(path)
    for where in (path, *path.parents):
        if where.exists() and not where.is_dir():
            which = "" if where == path else f" ({where} is a file)"
            raise ValueError(
                f"{flag} {path} is not a folder{which}: give a folder path (created when missing)"
            )
    marker = path / COMPLETION_MARKER
    if refuse_finished and marker.is_file():
        raise ValueError(
            f"{flag} {path} already holds a finished {_finished_what(marker)} ({COMPLETION_MARKER}); writing into "
            "it would replace it: choose a new folder, or delete this one to make it again"
        )
    return path


def _finished_what(marker: Path) -> str:
    try:
        stage = json.loads(marker.read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        stage = None
    return "stage" if stage is None else ("pretraining" if stage == "pretrain" else f"Stage {stage}")


def at_least(minimum: int):
    """An argparse `type`: a whole number >= `minimum`; argparse's error names the flag
    (`argument --n-samples: must be a whole number >= 1, got -3`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {value}")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse
