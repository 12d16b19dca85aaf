"""Bad configuration is refused by `moe-vlm train` itself, before any training starts: one line naming the field
to fix, exit status 2, no traceback, and nothing written to `--out`.

Each case starts from a real Stage 0 directory (or the dense control made from it) and breaks one thing the way a
person would: a recipe value, a hand-edited `config.json`, a recipe file or a command-line field.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from training_helpers import quick_args

from configuration.contract import COMPLETION_MARKER


@pytest.fixture(scope="module")
def dense(workdir, stage0):
    """A finished dense (non-MoE) directory: Stage 0's model through `trainer.dense.to_dense`."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    from trainer.dense import to_dense

    out = workdir / "dense"
    to_dense(AutoModelForCausalLM.from_pretrained(stage0, trust_remote_code=True), 0).save_pretrained(out)
    AutoProcessor.from_pretrained(stage0, trust_remote_code=True).save_pretrained(out)
    (out / COMPLETION_MARKER).write_text(json.dumps({"stage": "dense"}))
    return out


def edited_stage0(stage0: Path, to: Path, **fields) -> Path:
    """A copy of Stage 0 whose config.json has `fields` changed (`vision_cfg` entries: merged into it)."""
    shutil.copytree(stage0, to)
    config = json.loads((to / "config.json").read_text())
    vision_cfg = fields.pop("vision_cfg", None)
    if vision_cfg:
        config["vision_config"]["vision_cfg"].update(vision_cfg)
    config.update(fields)
    (to / "config.json").write_text(json.dumps(config))
    return to


# (case id, stage, what to break, a text the error must contain: the field)
CASES = [
    ("unknown_router_mode", "1", {"override": {"router_mode": "bogus"}}, "router_mode"),
    ("experts_per_token_above_experts", "1", {"config": {"num_experts_per_tok": 3}}, "num_experts_per_tok"),
    ("image_token_outside_vocabulary", "1", {"config": {"image_token_id": 40000}}, "image_token_id"),
    ("moe_layers_out_of_range", "1", {"config": {"moe_layers": [0, 5]}}, "moe_layers"),
    ("stage3_from_a_dense_model", "3", {"from": "dense"}, "not an MoE model"),
    ("vision_config_more_layers", "1", {"config": {"vision_cfg": {"layers": 3}}}, "vision_config"),
    ("vision_config_other_width", "1", {"config": {"vision_cfg": {"width": 32}}}, "vision_config"),
    ("recipe_file_unknown_field", "1", {"recipe": {"learning_rat": 1e-4}}, "learning_rat"),
    ("command_line_unknown_field", "1", {"override": {"learning_rat": 1e-4}}, "--learning_rat"),
    (
        "recipe_file_not_yaml",
        "1",
        {"recipe_text": "stage: '1'\nlearning_rate: [1e-4\n"},
        "is not valid YAML at line",
    ),
    # a recipe file replaces the embedded one whole: an empty one would train on TrainingArguments' defaults
    ("recipe_file_empty", "1", {"recipe_text": ""}, "is empty"),
    # transformers reads any max_steps <= 0 as "train num_train_epochs epochs"
    ("max_steps_negative", "1", {"override": {"max_steps": -5}}, "max_steps must be >= 1, or -1"),
    (
        "no_step_budget",
        "1",
        {"override": {"max_steps": -1, "num_train_epochs": 0}},
        "num_train_epochs must be > 0",
    ),
    ("config_cut_short", "1", {"file": ("config.json", '{"model_type": "moe_vlm",\n')}, "is not valid JSON"),
    ("weights_cut_short", "1", {"file": ("model.safetensors", "")}, "cannot be read as safetensors"),
]


@pytest.mark.parametrize("stage, broken, field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_refused_before_training(stage, broken, field, workdir, shapes, stage0, dense, capsys):
    from moe_vlm_cli import main

    case = workdir / f"case_{len(list(workdir.glob('case_*')))}"
    case.mkdir()
    source = dense if broken.get("from") == "dense" else stage0
    if "config" in broken:
        source = edited_stage0(stage0, case / "from", **broken["config"])
    if "file" in broken:  # one file of the checkpoint cut short, as an interrupted copy leaves it
        name, text = broken["file"]
        source = edited_stage0(stage0, case / "from")
        (source / name).write_text(text)
    argv = ["train", "--stage", stage, "--from", str(source), "--out", str(case / "out")]
    if "recipe" in broken or "recipe_text" in broken:
        recipe = case / "recipe.yaml"
        recipe.write_text(broken.get("recipe_text", json.dumps({"stage": stage, **broken.get("recipe", {})})))
        argv += ["--recipe", str(recipe)]
    argv += quick_args(shapes, **broken.get("override", {}))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    error = err.strip().splitlines()[-1]
    assert error.startswith("moe-vlm train: error: ") and field in error, err
    if "config" in broken:  # which file to fix
        assert str(case / "from" / "config.json") in error, error
    if "file" in broken:
        assert str(case / "from" / broken["file"][0]) in error, error
    if "recipe_text" in broken:
        assert str(case / "recipe.yaml") in error, error
    assert not (case / "out").exists(), "the stage wrote its output directory before refusing"


def test_misspelt_field_is_not_taken_for_another(shapes, stage0):
    """argparse's prefix matching would read `--learning_rat` (or `--max_step`) as `--learning_rate`; the recipe
    parser refuses it, saying which field was probably meant."""
    from trainer.recipes import parse_recipe

    with pytest.raises(ValueError, match=r"--max_step \(did you mean --max_steps\?\)"):
        parse_recipe("1", "unused", from_dir=stage0, overrides=["--max_step", "2"])
