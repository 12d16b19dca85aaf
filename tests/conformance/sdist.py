"""Fetch transformers' common model tests from the sdist of the installed transformers and lay them out as a package.

The sdist of `transformers==X` holds the top-level `tests/*.py` (`test_modeling_common.py` with `ModelTesterMixin`,
`test_configuration_common.py`, `test_training_mixin.py`, ...), but not `tests/models/`, `tests/generation/`,
`tests/exporters/` nor `tests/utils/`, which some of those files import relatively. The files are never copied into
this repository: they are downloaded with pip at run time, cached per version, and extracted as the package
`transformers_tests` next to a few stub modules standing in for the missing ones (see `STUBS`).

Cache: `$MOE_VLM_CONFORMANCE_CACHE` or `${XDG_CACHE_HOME:-~/.cache}/moe-vlm/transformers-tests/<version>/`, holding the
downloaded `transformers-<version>.tar.gz` and the laid-out `transformers_tests/`; a lock file serialises concurrent
builders (several pytest runs may share the machine).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from importlib.metadata import version as installed_version
from pathlib import Path

PACKAGE = "transformers_tests"

# Modules that the sdist's files import but the sdist does not ship. Each stub says why it is empty.
STUBS = {
    "__init__.py": (
        '"""transformers\' top-level tests/*.py from the sdist (laid out by tests/conformance/sdist.py).\n\n'
        "Kept empty: test_configuration_common.py executes this file through `direct_transformers_import`.\n"
        '"""\n'
    ),
    "generation/__init__.py": "",
    "generation/test_utils.py": (
        '"""Stub: tests/generation/test_utils.py is not in the transformers sdist.\n\n'
        "`GenerationTesterMixin` is an empty mixin here, so the `generate` suite is NOT run by the conformance\n"
        "harness; test classes still inherit it, as transformers' own causal-LM tests do, so that\n"
        "`test_generation_tester_mixin_inheritance` checks what it checks upstream.\n"
        '"""\n\n\n'
        "class GenerationTesterMixin:\n"
        '    """Empty: the generation tests are not in the sdist."""\n'
    ),
    "exporters/__init__.py": "",
    "exporters/test_export.py": (
        '"""Stub: tests/exporters/test_export.py is not in the transformers sdist.\n\n'
        "`ExportTesterMixin` (the torch.export suite `ModelTesterMixin` inherits) is empty here: the export tests\n"
        "are NOT run by the conformance harness.\n"
        '"""\n\n\n'
        "class ExportTesterMixin:\n"
        '    """Empty: the export tests are not in the sdist."""\n'
    ),
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": (
        '"""Stub: tests/utils/test_configuration_utils.py is not in the transformers sdist.\n\n'
        "`ConfigTester.check_config_arguments_init` sets these common `PreTrainedConfig` arguments to non-default\n"
        "values and checks the config keeps them. This is our own choice of values (not upstream's list), restricted\n"
        "to the fields the installed `PreTrainedConfig` declares.\n"
        '"""\n\n'
        "import dataclasses\n\n"
        "from transformers import PreTrainedConfig\n\n"
        "_CANDIDATES = {\n"
        '    "return_dict": False,\n'
        '    "output_hidden_states": True,\n'
        '    "dtype": "float16",\n'
        '    "chunk_size_feed_forward": 5,\n'
        '    "architectures": ["BertModel"],\n'
        '    "id2label": {0: "label"},\n'
        '    "label2id": {"label": "0"},\n'
        '    "problem_type": "regression",\n'
        "}\n"
        "_FIELDS = {field.name for field in dataclasses.fields(PreTrainedConfig)}\n"
        "config_common_kwargs = {key: value for key, value in _CANDIDATES.items() if key in _FIELDS}\n"
    ),
}

_TOP_LEVEL_TEST_FILE = re.compile(r"^transformers-[^/]+/tests/[^/]+\.py$")


class SdistUnavailable(RuntimeError):
    """The sdist could not be downloaded (no registry access, or a version that is not on PyPI)."""


def transformers_version() -> str:
    """Version of the installed transformers (read from its metadata: no heavy import)."""
    return installed_version("transformers")


def cache_dir(version: str) -> Path:
    """Per-version cache folder (see the module docstring)."""
    root = os.environ.get("MOE_VLM_CONFORMANCE_CACHE")
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "moe-vlm", "transformers-tests")
    return Path(root) / version


@contextmanager
def locked(folder: Path, name: str = ".lock"):
    """Exclusive lock on `folder/name`, so two runs sharing the cache never build the same thing at once (not
    re-entrant: use one name per thing built)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def download_sdist(version: str, dest: Path) -> Path:
    """`pip download` the sdist of `transformers==version` into `dest`; raise `SdistUnavailable` with pip's reason."""
    archive = dest / f"transformers-{version}.tar.gz"
    if archive.exists():
        return archive
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--retries",
            "2",
            "--timeout",
            "30",
            "--disable-pip-version-check",
            "--quiet",
            "-d",
            tmp,
            f"transformers=={version}",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(Path(tmp).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not found:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
            raise SdistUnavailable(
                f"could not download the sdist of transformers=={version} from the package registry (PyPI), which "
                f"the conformance harness takes transformers' common model tests from. Is PyPI reachable (CI can "
                f"reach it), and is {version} a released version? pip said:\n{tail}"
            )
        os.replace(found[0], archive)
    return archive


def _extract_tests(archive: Path, target: Path) -> int:
    """Extract the sdist's top-level `tests/*.py` into `target`; return how many files were written."""
    count = 0
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and _TOP_LEVEL_TEST_FILE.match(member.name):
                source = tar.extractfile(member)
                (target / Path(member.name).name).write_bytes(source.read())
                count += 1
    return count


def _write_stubs(target: Path) -> None:
    for relative, text in STUBS.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def prepare(version: str | None = None) -> Path:
    """Return a folder whose `transformers_tests/` package holds the common tests of `version` (default: installed).

    Put the returned folder on `PYTHONPATH` to import e.g. `transformers_tests.test_modeling_common`. Built once per
    version: later calls only check the cache.
    """
    version = version or transformers_version()
    root = cache_dir(version)
    package = root / PACKAGE
    if (package / "test_modeling_common.py").exists():
        return root
    with locked(root):
        if (package / "test_modeling_common.py").exists():  # built by another process while we waited
            return root
        archive = download_sdist(version, root)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
        try:
            if _extract_tests(archive, staging) == 0 or not (staging / "test_modeling_common.py").exists():
                raise SdistUnavailable(f"{archive} holds no tests/test_modeling_common.py")
            _write_stubs(staging)
            os.replace(staging, package)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root
