"""Read the conformance subprocess's junit xml into per-test outcomes, and summarise failures by cause.

A unittest `subTest` shows up as extra `<testcase>` entries of the same name, or as several `<failure>`s of one entry,
so results are merged per test: failed if any subtest failed or errored (the first failure is the cause, the others
are kept), passed if anything else ran, skipped otherwise.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# `path.py:123: in function` lines of a `--tb=short` traceback.
_FRAME = re.compile(r"^(?P<path>[^\s:]+\.py):(?P<line>\d+): in (?P<func>\S+)", re.MULTILINE)
_ERROR_LINE = re.compile(r"^E\s+(?P<text>\S.*)$", re.MULTILINE)
# Frames worth naming: our model first, then our harness (a failure raised there is a harness problem).
_OWN_CODE = ("modeling_moe_vlm/", "tests/conformance/")


@dataclass(frozen=True)
class Outcome:
    """One test's result; for a failure, `cause` is the exception line and `where` the frame that points at it."""

    name: str
    status: str  # "passed" | "failed" | "skipped"
    cause: str = ""
    where: str = ""
    others: tuple[str, ...] = ()  # causes of further failing subtests


def _frame_to_name(text: str) -> str:
    """The deepest frame in our own code, else the deepest frame at all, as `path:line in function`."""
    frames = list(_FRAME.finditer(text))
    own = [frame for frame in frames if any(part in frame["path"] for part in _OWN_CODE)]
    chosen = (own or frames or [None])[-1]
    if chosen is None:
        return ""
    path = chosen["path"]
    for part in _OWN_CODE:  # shorten site-packages and cache paths to the part a reader recognises
        if part in path:
            path = path[path.index(part) :]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    if "transformers_tests/" in path:
        path = "transformers_tests/" + path.split("transformers_tests/", 1)[1]
    return f"{path}:{chosen['line']} in {chosen['func']}"


def _cause(element: ET.Element) -> str:
    """The first `E   ...` line of the traceback (the exception), else the junit message's first line."""
    match = _ERROR_LINE.search(element.text or "")
    if match:
        return match["text"].strip()[:300]
    message = (element.get("message") or "").strip()
    return message.splitlines()[0][:300] if message else ""


def _entries(case: ET.Element) -> list[Outcome]:
    """One outcome per failure or error in a `<testcase>`, else its skip or pass."""
    name = case.get("name", "")
    failures = [child for child in case if child.tag in ("failure", "error")]
    if failures:
        return [Outcome(name, "failed", _cause(f), _frame_to_name(f.text or "")) for f in failures]
    skipped = case.find("skipped")
    if skipped is not None:
        return [Outcome(name, "skipped", (skipped.get("message") or "").strip()[:300])]
    return [Outcome(name, "passed")]


def _merge(entries: list[Outcome]) -> Outcome:
    failed = [entry for entry in entries if entry.status == "failed"]
    if failed:
        first = failed[0]
        return Outcome(first.name, "failed", first.cause, first.where, tuple(e.cause for e in failed[1:]))
    return next((entry for entry in entries if entry.status == "passed"), entries[0])


def parse_junit(path: str | Path) -> dict[str, dict[str, Outcome]]:
    """`{test class name: {test name: Outcome}}` from a pytest junit xml."""
    grouped: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    for case in ET.parse(path).getroot().iter("testcase"):
        cls = case.get("classname", "").rsplit(".", 1)[-1]
        grouped[cls, case.get("name", "")].extend(_entries(case))
    outcomes: dict[str, dict[str, Outcome]] = defaultdict(dict)
    for (cls, name), entries in grouped.items():
        outcomes[cls][name] = _merge(entries)
    return dict(outcomes)


def passed(outcomes: dict[str, Outcome]) -> set[str]:
    return {name for name, outcome in outcomes.items() if outcome.status == "passed"}


def group_by_cause(failures: list[Outcome]) -> dict[tuple[str, str], list[Outcome]]:
    """`{(cause, where): [outcomes]}`, largest group first."""
    groups: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    for outcome in failures:
        groups[outcome.cause, outcome.where].append(outcome)
    return dict(sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])))


def format_failures(title: str, failures: list[Outcome], max_others: int = 8) -> str:
    """A report of failures grouped by cause: one line per cause, the further subtest failures that came with it
    (at most `max_others`), then the tests it broke."""
    lines = [title]
    for (cause, where), outcomes in group_by_cause(failures).items():
        lines.append(f"- {len(outcomes)} x {cause or '(no message)'}" + (f"  [at {where}]" if where else ""))
        others = sorted({other for outcome in outcomes for other in outcome.others})
        lines.extend(f"      and subtest: {other}" for other in others[:max_others])
        if len(others) > max_others:
            lines.append(f"      and {len(others) - max_others} more failing subtests")
        lines.extend(f"    {outcome.name}" for outcome in sorted(outcomes, key=lambda o: o.name))
    return "\n".join(lines)
