"""The calibrated lists: per transformers version, the common tests that Mistral and Mixtral both pass here.

A list is a text file, one test name per line (`#` starts a comment), kept in `calibrated/` and committed, so a
review sees exactly which of transformers' tests MoeVlm is held to, and a transformers upgrade shows as a diff.
"""

from __future__ import annotations

from pathlib import Path

from .results import Outcome, passed

CALIBRATED_DIR = Path(__file__).resolve().parent / "calibrated"


def list_path(version: str) -> Path:
    return CALIBRATED_DIR / f"transformers-{version}.txt"


def read_names(path: str | Path) -> set[str]:
    """The test names in a list file (blank lines and `#` comments ignored)."""
    lines = Path(path).read_text().splitlines()
    return {line.split("#", 1)[0].strip() for line in lines} - {""}


def _not_calibrated(mistral: dict[str, Outcome], mixtral: dict[str, Outcome]) -> list[str]:
    """Comment lines naming each test that one reference model passes and the other fails or skips, and why."""
    lines = []
    for name in sorted(set(mistral) | set(mixtral)):
        statuses = {
            model: outcomes.get(name, Outcome(name, "absent"))
            for model, outcomes in (("Mistral", mistral), ("Mixtral", mixtral))
        }
        if [o.status for o in statuses.values()].count("passed") != 1:
            continue
        for model, outcome in statuses.items():
            if outcome.status != "passed":
                lines.append(f"#   {name}: {model} {outcome.status}: {outcome.cause}")
    return lines


def write_list(
    version: str, mistral: dict[str, Outcome], mixtral: dict[str, Outcome], seconds: float
) -> Path:
    """Write the list of `version`: the tests both reference models pass, with a header saying how it was made."""
    both = sorted(passed(mistral) & passed(mixtral))
    header = [
        f"# transformers {version}: the common model tests that transformers' own Mistral and Mixtral both pass on the",
        "# conformance harness (tests/conformance; skipped tests excluded). MoeVlm must pass all of them in every router",
        "# mode. Derived by `python -m tests.conformance calibrate` (re-derive with --force); do not edit by hand.",
        f"# Mistral passes {len(passed(mistral))}, Mixtral passes {len(passed(mixtral))}, both pass {len(both)} "
        f"(calibration took {seconds:.0f} s).",
        "# Not calibrated: tests that one reference model passes and the other fails or skips (tests that both fail",
        "# or both skip are not listed):",
        *_not_calibrated(mistral, mixtral),
    ]
    path = list_path(version)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text("\n".join(header + both) + "\n")
    partial.replace(path)  # readers never see half a list
    return path
