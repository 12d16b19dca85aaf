"""One stage-directory contract: every file name and modality word lives in `configuration/contract.py`.

The two copies that must exist are checked equal: the Space's marker name (a Hub Space runs without the project
installed) and the model config's modality words (remote code cannot import the project). Any other module that
spells one of the contract's file names as a string literal is a second source and fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

from configuration import contract

REPO = Path(__file__).resolve().parents[1]
PACKAGES = (
    "modeling_moe_vlm",
    "configuration",
    "trainer",
    "analysis",
    "pipeline",
    "hub",
    "space",
    "benchmarks",
)
FILE_NAMES = {
    contract.ADAPTER_CONFIG_FILE,
    contract.ADAPTER_WEIGHTS_FILE,
    contract.COMPLETION_MARKER,
    contract.RECIPE_FILE,
    contract.ROUTING_LOG_FILE,
    contract.PROBE_CHOICES_FILE,
    contract.ROUTING_SUMMARY_FILE,
    contract.ANALYSIS_FILE,
    contract.CAPTIONING_FILE,
    contract.TRANSFER_FILE,
    contract.REPORT_JSON,
    contract.REPORT_HTML,
}
# The copies that must exist, each checked equal below.
COPIES = {REPO / "configuration" / "contract.py", REPO / "space" / "model_source.py"}


def test_the_space_keeps_an_equal_copy_of_the_marker_name():
    from space import model_source

    assert model_source.MARKER == contract.COMPLETION_MARKER


def test_the_model_config_uses_the_contract_modality_words():
    from modeling_moe_vlm import MoeVlmConfig
    from modeling_moe_vlm.configuration_moe_vlm import MODALITIES

    assert MODALITIES == contract.MODALITIES
    assert set(MoeVlmConfig().modality_to_expert) == set(contract.MODALITIES)


def test_a_config_saved_with_the_old_modality_key_loads_unchanged():
    from modeling_moe_vlm import MoeVlmConfig

    assert MoeVlmConfig(modality_to_expert={"vision": 1, "text": 0}).modality_to_expert == {
        "image": 1,
        "text": 0,
    }


def string_literals(path: Path) -> list[tuple[str, int]]:
    """(value, line) of every plain string constant in `path`, docstrings excluded."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.value, node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_no_module_spells_a_contract_file_name_itself():
    second_sources = [
        f"{path.relative_to(REPO)}:{line} {value!r}"
        for package in PACKAGES
        for path in sorted((REPO / package).glob("**/*.py"))
        if path not in COPIES
        for value, line in string_literals(path)
        if value in FILE_NAMES
    ]
    assert second_sources == [], "import the name from configuration.contract instead"
