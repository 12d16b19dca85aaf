"""Conformance with transformers' own model tests: every common test that transformers' Mistral and Mixtral pass on
the harness (the calibrated list of the installed transformers version) must pass on MoeVlm in each router mode.

The harness lives in tests/conformance (see its `__init__` docstring); each test here runs it in a subprocess, so
the sdist's test files are never imported into this suite. Needs the package registry (PyPI) once per transformers
version to fetch the sdist (cached afterwards). One mode alone: `pytest tests/test_transformers_conformance.py -k hard`
or `python -m tests.conformance run --mode hard`.
"""

from __future__ import annotations

import textwrap

import pytest
from conformance import runner, sdist
from conformance.results import parse_junit

from modeling_moe_vlm import ROUTER_MODES


@pytest.fixture(scope="session")
def calibrated_list():
    """The calibrated list of the installed transformers (derived first if this version has none)."""
    try:
        return runner.calibrated_list()
    except (sdist.SdistUnavailable, runner.HarnessError) as error:
        pytest.fail(f"conformance harness: {error}", pytrace=False)


@pytest.mark.parametrize("mode", ROUTER_MODES)
def test_calibrated_transformers_tests_pass(mode, calibrated_list):
    try:
        report = runner.run_mode(mode)
    except (sdist.SdistUnavailable, runner.HarnessError) as error:
        pytest.fail(f"conformance harness: {error}", pytrace=False)
    if not report.ok:
        pytest.fail(report.summary(), pytrace=False)


def test_junit_merges_subtests_and_names_the_cause(tmp_path):
    """The harness's own reading of results: a failing subtest fails its test, the cause is the exception line and
    the location the deepest frame in our code."""
    xml = tmp_path / "junit.xml"
    xml.write_text(
        textwrap.dedent(
            """\
            <testsuites><testsuite>
              <testcase classname="tests.conformance.cases.MoeVlmHardModelTest" name="test_a"/>
              <testcase classname="tests.conformance.cases.MoeVlmHardModelTest" name="test_a">
                <failure message="boom">x/transformers_tests/test_modeling_common.py:10: in test_a
                model(**inputs)
            /repo/modeling_moe_vlm/modeling_moe_vlm.py:42: in forward
                raise ValueError("bad")
            E   ValueError: bad</failure>
              </testcase>
              <testcase classname="tests.conformance.cases.MoeVlmHardModelTest" name="test_b">
                <skipped message="not on CPU"/>
              </testcase>
            </testsuite></testsuites>
            """
        )
    )
    outcomes = parse_junit(xml)["MoeVlmHardModelTest"]
    assert outcomes["test_a"].status == "failed"
    assert outcomes["test_a"].cause == "ValueError: bad"
    assert outcomes["test_a"].where == "modeling_moe_vlm/modeling_moe_vlm.py:42 in forward"
    assert outcomes["test_b"].status == "skipped"
    report = runner.ModeReport("hard", {"test_a", "test_b", "test_c"}, outcomes, 0.0)
    # a skipped calibrated test and a missing one count as failures too
    assert [o.name for o in report.failures] == ["test_a", "test_b", "test_c"]
