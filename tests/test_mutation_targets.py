"""The `make mutation` set-up (tests/mutation/): every target names a module, scope and test files that exist, and
the scope/operator filter keeps exactly the mutants it should. The mutation run itself is not in CI (an hour)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "run_mutation", REPO / "tests" / "mutation" / "run_mutation.py"
)
run_mutation = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = run_mutation  # dataclasses look their module up there
_spec.loader.exec_module(run_mutation)

SOURCE = """import x

def first(a):
    return a + 1

@decorator
def second(b):
    if b < 2:
        return b
    return -b

class Third:
    def method(self):
        return 3
"""


def test_scope_is_the_named_definitions_with_their_decorators():
    assert run_mutation.scope_lines(SOURCE, ["first"]) == {3, 4}
    assert run_mutation.scope_lines(SOURCE, ["second", "Third"]) == {6, 7, 8, 9, 10, 12, 13, 14}
    assert run_mutation.scope_lines(SOURCE, []) >= set(range(1, 15))
    with pytest.raises(SystemExit, match="m.py has no top-level gone"):
        run_mutation.scope_lines(SOURCE, ["first", "gone"], "m.py")


def test_only_allowed_operators_in_scope_are_kept():
    _, operators = run_mutation.load_targets()
    lines = run_mutation.scope_lines(SOURCE, ["second"])

    def kept(operator: str, line: int) -> bool:
        return run_mutation.keep_mutation(
            {"start_pos": (line, 4), "operator_name": operator}, lines, operators
        )

    assert kept("core/ReplaceComparisonOperator_Lt_LtE", 8)
    assert kept("core/NumberReplacer", 8)
    assert not kept("core/ReplaceComparisonOperator_Lt_LtE", 4)  # out of scope
    assert not kept("core/ReplaceComparisonOperator_Lt_Is", 8)  # not in the allow-list
    assert not kept("core/ReplaceBinaryOperator_Add_LShift", 8)


def test_equivalents_match_by_target_text_and_operator():
    entries = [
        {
            "target": "t",
            "line": "return -b",
            "operator": "core/NumberReplacer",
            "kind": "equivalent",
            "reason": "why",
        },
        {"target": "t", "line": "x = 32 * 2**20", "operator": "*", "kind": "choice", "reason": "a budget"},
    ]
    assert (
        run_mutation.is_equivalent("t", "    return -b  ", "core/NumberReplacer", 3, entries)
        == "equivalent: why"
    )
    assert run_mutation.is_equivalent(
        "t", "x = 32 * 2**20", "core/ReplaceBinaryOperator_Pow_Mul", 0, entries
    ) == ("choice: a budget")
    assert run_mutation.is_equivalent("u", "return -b", "core/NumberReplacer", 3, entries) is None
    assert run_mutation.is_equivalent("t", "return b", "core/NumberReplacer", 3, entries) is None


def test_every_target_exists_and_every_equivalent_names_a_real_line():
    targets, _ = run_mutation.load_targets()
    names = [t.name for t in targets]
    assert len(names) == len(set(names))
    for target in targets:
        module = REPO / target.module
        assert module.is_file(), target.module
        run_mutation.scope_lines(module.read_text(), target.scope, target.module)  # raises on a missing name
        files = [a for a in target.tests if a.startswith("tests/")]
        assert files and all((REPO / f).is_file() for f in files), target.tests
    by_name = {t.name: t for t in targets}
    for entry in run_mutation._equivalents():
        assert entry["reason"].strip() and entry["kind"] in ("equivalent", "choice"), entry
        text = (REPO / by_name[entry["target"]].module).read_text()
        assert entry["line"] in {line.strip() for line in text.splitlines()}, entry
