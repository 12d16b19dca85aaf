"""What a reproduction ran with: the machine, the seed(s) and the versions of the packages that decide its numbers.

The same seed gives the same numbers only with the same software: the report records both, so a rerun that
disagrees can be told apart from a rerun on other versions. Versions are read from the installed distributions
(`importlib.metadata`), None for one that is not installed.
"""

from __future__ import annotations

import html
import platform
from importlib import metadata

# The distributions whose versions change what a run computes or how it is loaded and written.
PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "open_clip_torch",
    "numpy",
    "scipy",
    "scikit-learn",
    "pillow",
    "peft",
)


def package_versions() -> dict[str, str | None]:
    """{"python": version, distribution: version or None (not installed)} for `PACKAGES`."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance() -> dict:
    """`machine` and `versions`, the parts of a report's provenance that do not depend on the run."""
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "versions": package_versions(),
    }


def provenance_html(report: dict) -> str:
    """A report's "Ran with" section: seed(s), machine and package versions (what `provenance` recorded)."""
    seeds = report.get("seeds", [report.get("seed")])
    rows = [("seed" + ("s" if len(seeds) > 1 else ""), ", ".join(str(s) for s in seeds))]
    machine = report.get("machine") or {}
    rows += [(key, value) for key, value in machine.items()]
    rows += [(name, version or "not installed") for name, version in (report.get("versions") or {}).items()]
    cells = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
        for k, v in rows
    )
    return f"<h2>Ran with</h2><table><tr><th>what</th><th>value</th></tr>{cells}</table>"


__all__ = ["PACKAGES", "package_versions", "provenance", "provenance_html"]
