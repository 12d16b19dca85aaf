"""The `make mutation` set-up (tests/mutation/): every target names a module, scope and test files that exist, and
the scope/operator filter keeps exactly the mutants it should. The mutation run itself is not in CI (an hour)."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import time
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
        for stage in target.tests:
            files = [a for a in stage if a.startswith("tests/")]
            assert files and all((REPO / f).is_file() for f in files), stage
    by_name = {t.name: t for t in targets}
    for entry in run_mutation._equivalents():
        assert entry["reason"].strip() and entry["kind"] in ("equivalent", "choice"), entry
        text = (REPO / by_name[entry["target"]].module).read_text()
        assert entry["line"] in {line.strip() for line in text.splitlines()}, entry


def test_a_target_s_stages_run_in_order_each_only_after_the_one_before_passed():
    target = run_mutation.Target("t", "m.py", [["tests/a.py"], ["tests/b.py", "-k", "not slow one"]])
    cold = shlex.split(run_mutation.test_command(target))
    assert cold[:2] == ["sh", "-c"]
    first, second = cold[2].split(" && ")
    assert shlex.split(first)[-5:] == ["-x", "-q", "-p", "no:cacheprovider", "tests/a.py"]
    assert shlex.split(second)[-3:] == ["tests/b.py", "-k", "not slow one"]
    warm = shlex.split(run_mutation.test_command(target, "/tmp/s.sock"))[2].split(" && ")
    assert all(shlex.split(w)[2:5] == ["run", "/tmp/s.sock", "--"] for w in warm)
    one = run_mutation.Target("t", "m.py", [["tests/a.py"]])
    assert shlex.split(run_mutation.test_command(one))[1:3] == ["-m", "pytest"]  # one stage: no shell


def test_a_flat_tests_list_is_refused_with_the_form_to_use():
    with pytest.raises(SystemExit, match="list of pytest argument lists"):
        run_mutation.Target("t", "m.py", ["tests/a.py"])


WARM = REPO / "tests" / "mutation" / "warm_pytest.py"


def _warm_run(socket_path, tree):
    return subprocess.run(
        [sys.executable, str(WARM), "run", str(socket_path), "--", "-q", "-p", "no:cacheprovider", "test_it.py"],
        cwd=tree, capture_output=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=120,
    ).returncode  # fmt: skip


def test_the_warm_server_s_forks_see_each_mutant_time_out_and_a_lost_server_falls_back_to_a_cold_run(
    tmp_path,
):
    """What makes a warm verdict equal to a cold one: every fork imports the module from disk (a same-size edit made
    within the same second is seen), a hung test run is killed and counts as failed, and without a server the client
    runs the same tests itself rather than report a kill."""
    (tmp_path / "mutme.py").write_text("def f(a):\n    return a + 1\n")
    (tmp_path / "test_it.py").write_text(
        "import os, time\nfrom mutme import f\n\n\ndef test_f():\n"
        "    if os.environ.get('HANG'):\n        time.sleep(60)\n    assert f(1) == 2\n"
    )
    sock = tmp_path / "s.sock"
    server = subprocess.Popen([sys.executable, str(WARM), "serve", str(sock), "--timeout", "5"], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not sock.exists() and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.2)
        assert sock.exists(), "the server did not start"
        time.sleep(0.5)  # bound, then listening
        assert _warm_run(sock, tmp_path) == 0
        (tmp_path / "mutme.py").write_text("def f(a):\n    return a - 1\n")  # same size, same second
        assert _warm_run(sock, tmp_path) == 1
        (tmp_path / "mutme.py").write_text("def f(a):\n    return a + 1\n")
        os.environ["HANG"] = "1"
        try:
            started = time.monotonic()
            assert _warm_run(sock, tmp_path) == 124
            assert time.monotonic() - started < 30
        finally:
            del os.environ["HANG"]
        assert _warm_run(sock, tmp_path) == 0  # still serving after a timeout
    finally:
        server.kill()
        server.wait()
    (tmp_path / "mutme.py").write_text("def f(a):\n    return a * 1\n")
    assert _warm_run(sock, tmp_path) == 1  # no server: the client ran pytest itself and saw the mutant
