"""Data flows one way: configuration -> trainer -> analysis -> pipeline -> hub / space (README, "Layout").

Every import of a project package, at the top of a module or inside a function (a lazy import is still a
dependency), is read from the source with `ast` and checked against the layer order. The model package is the floor:
it ships as remote code and imports nothing of the project.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lower number = lower layer. A package may import packages of a lower layer only (and itself). The console script
# `moe_vlm_cli` collects the commands by name (importlib) and imports no project package itself, so every package
# above the model may use its `main` and `UserError` (the reproduction runs its steps through `main`, as a user would).
LAYERS = {
    "modeling_moe_vlm": 0,
    "moe_vlm_cli": 0.5,
    "configuration": 1,
    "trainer": 2,
    "analysis": 3,
    "pipeline": 4,
    "hub": 5,
    "space": 5,
    "benchmarks": 6,
}


def project_imports(path: Path) -> set[tuple[str, int]]:
    """(top-level project package, line) for every absolute import in `path` that names a project package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in LAYERS:
                found.add((top, node.lineno))
    return found


def upward_imports(root: Path = REPO) -> list[str]:
    problems = []
    for package, layer in LAYERS.items():
        files = (
            [root / f"{package}.py"]
            if (root / f"{package}.py").is_file()
            else sorted(root.glob(f"{package}/**/*.py"))
        )
        for path in files:
            for imported, line in sorted(project_imports(path)):
                if imported == package:
                    continue
                if LAYERS[imported] >= layer:
                    problems.append(
                        f"{path.relative_to(root)}:{line} imports {imported} (layer {LAYERS[imported]} >= {layer})"
                    )
    return problems


def test_every_package_is_in_the_layer_order():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} | {p.stem for p in REPO.glob("*.py")}
    assert packages - {"tests"} <= set(LAYERS), (
        f"add these to LAYERS: {sorted(packages - {'tests'} - set(LAYERS))}"
    )


def test_no_package_imports_a_layer_above_it():
    assert upward_imports() == []


@pytest.mark.parametrize(
    ("package", "source", "caught"),
    [
        ("trainer", "from analysis.load import expert_load\n", True),  # the import this test was written for
        ("configuration", "def f():\n    import analysis.routing\n", True),  # lazy imports count
        ("hub", "from space import app\n", True),  # siblings of one layer do not import each other
        ("analysis", "from trainer.load_stats import group_stats\n", False),
        ("analysis", "from .load import expert_load\n", False),
    ],
)
def test_the_check_catches_an_upward_import(tmp_path, package, source, caught):
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "bad.py").write_text(source)
    assert bool(upward_imports(tmp_path)) == caught
