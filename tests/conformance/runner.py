"""Run the conformance test classes in a pytest subprocess and turn its junit xml into reports.

A subprocess, because the sdist's tests are imported as the package `transformers_tests` with their own habits
(warning filters, module-level registration of our model in transformers' name mappings): none of that may leak
into the project's test run. The subprocess uses `pytest.ini` of this folder (not the project's pyproject settings),
skips the project's conftest, runs offline like the project's tests, and writes a junit xml that is parsed here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import MISTRAL_CASE, MIXTRAL_CASE, NOT_APPLICABLE, calibration, moe_vlm_case, sdist
from .plugin import SELECT_ENV
from .results import Outcome, format_failures, parse_junit, passed

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CASES = HERE / "cases.py"
PER_TEST_TIMEOUT_S = 600  # a hung test fails alone (pytest-timeout) ...
RUN_TIMEOUT_S = 3600  # ... and a hung run as a whole raises HarnessError
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class HarnessError(RuntimeError):
    """The subprocess did not produce results for a requested class (import or collection error)."""


def _environment(sdist_root: Path, select: Path | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != SELECT_ENV}
    paths = [str(HERE.parent), str(sdist_root), str(REPO), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(OFFLINE_ENV)
    if select is not None:
        env[SELECT_ENV] = str(select)
    return env


def _command(classes: list[str], junit: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", *[f"{CASES}::{cls}" for cls in classes]]
    cmd += [
        "-c",
        str(HERE / "pytest.ini"),
        "--rootdir",
        str(REPO),
        "--noconftest",
        "-p",
        "conformance.plugin",
    ]
    cmd += ["-q", "--tb=short", "-rN", f"--junitxml={junit}"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append(f"--timeout={PER_TEST_TIMEOUT_S}")
    return cmd


def run_classes(
    classes: list[str], select: Path | None = None, version: str | None = None
) -> dict[str, dict[str, Outcome]]:
    """Run the given test classes of `cases.py` (only the tests named in `select`, if given) in a subprocess."""
    root = sdist.prepare(version)
    with tempfile.TemporaryDirectory(prefix="moe-vlm-conformance-") as tmp:
        junit = Path(tmp) / "junit.xml"
        try:
            result = subprocess.run(
                _command(classes, junit),
                cwd=REPO,
                env=_environment(root, select),
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as error:
            raise HarnessError(f"the conformance run of {classes} took over {RUN_TIMEOUT_S} s") from error
        outcomes = parse_junit(junit) if junit.exists() else {}
    missing = [cls for cls in classes if not outcomes.get(cls)]
    if missing:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-40:])
        raise HarnessError(f"no test results for {missing} (pytest exit code {result.returncode}):\n{tail}")
    return outcomes


@dataclass
class Calibration:
    path: Path
    names: set[str]
    mistral_passed: int
    mixtral_passed: int
    seconds: float


def calibrate(version: str | None = None) -> Calibration:
    """Run the common tests on Mistral and Mixtral and write the list of the tests both pass."""
    version = version or sdist.transformers_version()
    start = time.perf_counter()
    outcomes = run_classes([MISTRAL_CASE, MIXTRAL_CASE], version=version)
    seconds = time.perf_counter() - start
    mistral, mixtral = outcomes[MISTRAL_CASE], outcomes[MIXTRAL_CASE]
    path = calibration.write_list(version, mistral, mixtral, seconds)
    return Calibration(
        path, calibration.read_names(path), len(passed(mistral)), len(passed(mixtral)), seconds
    )


def calibrated_list(version: str | None = None) -> Path:
    """The list of `version` (default: the installed transformers), derived first when this version has none."""
    version = version or sdist.transformers_version()
    path = calibration.list_path(version)
    if not path.exists():
        sdist.prepare(version)  # takes the cache's own lock: fetch before taking the calibration lock
        with sdist.locked(sdist.cache_dir(version), ".calibrate.lock"):  # two runs must not calibrate at once
            if not path.exists():
                calibrate(version)
    return path


@dataclass
class ModeReport:
    """Result of the calibrated tests on MoeVlm in one router mode. A skipped calibrated test counts as failing:
    both reference models ran and passed it. The `NOT_APPLICABLE` ones are left out and listed with their reason."""

    mode: str
    calibrated: set[str]
    outcomes: dict[str, Outcome]
    seconds: float
    failures: list[Outcome] = field(init=False)
    not_applicable: dict[str, str] = field(init=False)

    def __post_init__(self):
        self.not_applicable = {
            name: NOT_APPLICABLE[name] for name in sorted(self.calibrated & set(NOT_APPLICABLE))
        }
        self.calibrated = self.calibrated - set(NOT_APPLICABLE)
        self.failures = []
        for name in sorted(self.calibrated):
            outcome = self.outcomes.get(
                name, Outcome(name, "failed", "not collected: no such test in this run")
            )
            if outcome.status == "skipped":
                outcome = Outcome(name, "failed", f"skipped: {outcome.cause}", outcome.where)
            if outcome.status != "passed":
                self.failures.append(outcome)

    def _by_reason(self) -> list[tuple[str, list[str]]]:
        reasons: dict[str, list[str]] = {}
        for name, why in self.not_applicable.items():
            reasons.setdefault(why, []).append(name)
        return list(reasons.items())

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        head = (
            f"MoeVlm router_mode={self.mode}: {len(self.calibrated) - len(self.failures)}/{len(self.calibrated)} "
            f"calibrated tests pass ({self.seconds:.0f} s); {len(self.not_applicable)} not applicable to the "
            "text-only tester: " + "; ".join(f"{', '.join(names)}: {why}" for why, names in self._by_reason())
        )
        return (
            head
            if self.ok
            else format_failures(head + f"; {len(self.failures)} fail, by cause:", self.failures)
        )


def run_mode(mode: str, version: str | None = None) -> ModeReport:
    """Run every calibrated test on MoeVlm in `mode`."""
    select = calibrated_list(version)
    cls = moe_vlm_case(mode)
    start = time.perf_counter()
    outcomes = run_classes([cls], select=select, version=version)[cls]
    return ModeReport(mode, calibration.read_names(select), outcomes, time.perf_counter() - start)
