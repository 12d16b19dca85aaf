"""`moe-vlm ablate` (pipeline/ablate.py): the variant recipes, and a real smoke run of two variants on one seed with
a tiny budget (conftest's tiny model, a small Shapes world): the table has the declared columns, its numbers are the
ones the cells wrote (and the cells' are the ones their analyses hold), each variant's regulariser reached its
model, and a second invocation trains nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from training_helpers import make_shapes, make_stage0, quick_args, train

from configuration.contract import CACHE_ENV, COMPLETION_MARKER, TRANSFER_FILE
from pipeline import ablate
from trainer.recipes import parse_recipe

EXPECTED_VARIANTS = {
    "baseline",
    "hard",
    "specialise_weak",
    "specialise_strong",
    "switch",
    "modality_switch",
    "entropy_floor",
    "aux_free",
    "modality_aware",
    "long",
}


def test_every_variant_of_the_issue_has_a_recipe_that_parses(tmp_path):
    variants = ablate.load_variants()
    assert set(variants) == EXPECTED_VARIANTS
    for variant in variants.values():
        path = ablate.write_variant_recipe(variant, tmp_path / variant.name / "recipe.yaml")
        recipe = parse_recipe("3", tmp_path / variant.name / "out", recipe=str(path))
        for field, value in variant.stage3.items():
            section = recipe.stage if hasattr(recipe.stage, field) else recipe.training
            assert getattr(section, field) == value, (variant.name, field)
    hard = parse_recipe("3", tmp_path / "h", recipe=str(tmp_path / "hard" / "recipe.yaml"))
    assert hard.stage.router_learning_rate is None and hard.stage.keep_hard_routing  # null unsets the field
    assert (
        parse_recipe("3", tmp_path / "l", recipe=str(tmp_path / "long" / "recipe.yaml")).training.max_steps
        == 1000
    )


def test_unknown_or_malformed_variants_are_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown ablation variant\(s\) \['nope'\]"):
        ablate.choose_variants(["baseline", "nope"])
    (tmp_path / "bad.yaml").write_text("description: x\nstage3:\n  router_aux_loss_cof: 0.1\n")
    monkeypatch.setattr(ablate, "_variants_dir", lambda: tmp_path)
    with pytest.raises(ValueError, match=r"bad.yaml: unknown recipe field\(s\) \['router_aux_loss_cof'\]"):
        ablate.load_variants()


def test_transfer_worlds_are_checked_before_anything_is_built(tmp_path):
    with pytest.raises(ValueError, match="a word other than 'shifted'"):
        ablate.prepare_transfer(tmp_path, 0, {"shifted": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="not a saved DatasetDict"):
        ablate.prepare_transfer(tmp_path, 0, {"coco": str(tmp_path / "missing")})


def test_transfer_metrics_are_named_by_world():
    from pipeline.report import transfer_metrics

    transfer = {
        "name": "coco",
        "crossover": {"increase_pct": 3.5},
        "load": {"n_collapsed": 1, "n_collapsed_soft": 2, "layers": {"0": {"purity": {"balanced": 0.75}}}},
        "routing_information": {"mean_normalised": 0.25, "layers": {"0": {"normalised": 0.25}}},
        "grounding": {"n": 0, "skipped": "no objects"},
    }
    assert transfer_metrics(transfer) == {
        "transfer_coco_crossover_increase_pct": 3.5,
        "transfer_coco_collapsed_layers": 1.0,
        "transfer_coco_collapsed_soft_layers": 2.0,
        "transfer_coco_purity_balanced": 0.75,
        "transfer_coco_routing_mi": 0.25,
        "transfer_coco_routing_mi_layer0": 0.25,
    }


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Stages 0-2 of seed 0 from the test chain, then `ablate` over baseline and aux_free, 3 Stage 3 steps each."""
    root = tmp_path_factory.mktemp("ablate")
    mp = pytest.MonkeyPatch()
    mp.setenv(CACHE_ENV, str(root / "cache"))
    shapes = make_shapes(root / "shapes")
    seed_dir = root / "out" / "seed0"
    (seed_dir / "pretrain").mkdir(parents=True)
    (seed_dir / "pretrain" / COMPLETION_MARKER).write_text("{}")  # stands for a finished pretraining
    make_stage0(seed_dir / "stage0")
    train("1", seed_dir / "stage1", seed_dir / "stage0", quick_args(shapes, steps=2))
    train("2", seed_dir / "stage2", seed_dir / "stage1", quick_args(shapes, steps=2))
    budget = {
        "dataset": str(shapes),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "warmup_steps": 0,
        "routing_probe_samples": 4,
    }
    lines = []
    table = ablate.ablate(
        root / "out",
        ["baseline", "aux_free"],
        [0],
        jobs=2,
        n_samples=4,
        n_eval=4,
        overrides=budget,
        data_dir=shapes,
        n_instruction=1,
        log=lines.append,
    )
    yield root / "out", table, lines
    mp.undo()


def test_smoke_table_has_the_columns_and_the_cells_numbers(smoke):
    out, table, lines = smoke
    assert [c["key"] for c in table["columns"]] == [k for k, _, _ in ablate.COLUMNS]
    assert [r["variant"] for r in table["rows"]] == ["baseline", "aux_free"]
    written = json.loads((out / ablate.TABLE_JSON).read_text())
    markdown = (out / ablate.TABLE_MD).read_text()
    for row in written["rows"]:
        cell = json.loads((out / "seed0" / "ablations" / row["variant"] / ablate.CELL_MARKER).read_text())
        # the cell's numbers are its analyses' (recomputed from the files), and the table's are the cell's
        assert cell["metrics"] == ablate.cell_metrics(out / "seed0" / "ablations" / row["variant"])
        for key, value in cell["metrics"].items():
            assert row["metrics"][key]["values"] == {"0": value}
            assert row["metrics"][key]["mean"] == value  # one seed: the mean is the value, no interval
        assert {
            "captioning_CIDEr",
            "routing_mi",
            "raw_diagonal_k_over_n",
            "collapsed_layers",
            "instruction_accuracy",
            "saturation_settle_fraction",
            "saturation_changed_share",
            "transfer_shifted_routing_mi",
            "transfer_shifted_instruction_accuracy",
        } <= set(cell["metrics"])
        # the transfer numbers are the ones the cell's transfer measurement wrote, on the shifted world
        transfer = json.loads(
            (
                out / "seed0" / "ablations" / row["variant"] / "transfer" / "shifted" / TRANSFER_FILE
            ).read_text()
        )
        assert "shifted" in transfer["data"]
        assert (
            cell["metrics"]["transfer_shifted_routing_mi"]
            == transfer["routing_information"]["mean_normalised"]
        )
        assert cell["metrics"]["transfer_shifted_instruction_accuracy"] == transfer["instruction"]["accuracy"]
        assert transfer["instruction"]["n"] == len(
            transfer["instruction"]["by_kind"]
        )  # one question per kind
        assert f"| {row['variant']} |" in markdown
    for figure in written["figures"]:
        assert (out / figure).stat().st_size > 0
    for row in written["rows"]:  # each variant's dispatch-over-steps figure, linked
        assert set(row["dynamics_figures"]) == {"0"} and (out / row["dynamics_figures"]["0"]).is_file()
        assert row["dynamics_figures"]["0"] in markdown
    assert any("2/2" in line for line in lines)


def test_smoke_each_variant_reached_its_model(smoke):
    out, _, _ = smoke
    cells = out / "seed0" / "ablations"
    baseline = load_file(str(cells / "baseline" / "stage3" / "model.safetensors"))
    aux_free = load_file(str(cells / "aux_free" / "stage3" / "model.safetensors"))
    assert not any(k.endswith("expert_bias") for k in baseline)
    biases = [t for k, t in aux_free.items() if k.endswith("expert_bias")]
    assert biases and all(t.abs().max() > 0 for t in biases)  # 3 steps of 0.001
    config = json.loads((cells / "aux_free" / "stage3" / "config.json").read_text())
    assert config["router_bias_update_rate"] == 0.001


def test_smoke_rerun_trains_nothing_and_writes_the_same_table(smoke, monkeypatch):
    out, table, _ = smoke

    def refuse(*args, **kwargs):
        raise AssertionError("a complete cell ran again")

    monkeypatch.setattr(ablate, "run_cell", refuse)
    lines = []
    again = ablate.ablate(out, ["baseline", "aux_free"], [0], jobs=1, log=lines.append)
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in table["rows"]]
    assert any("2 complete, 0 to run" in line for line in lines)
    assert Path(out / ablate.TABLE_MD).is_file()


def test_transfer_to_a_coco_format_world_measures_the_routing_and_skips_grounding(smoke, tmp_path):
    """`--transfer coco=DIR`: a saved DatasetDict of real-format COCO records (a Karpathy file the test writes) gets
    the routing measurements; grounding, which needs Shapes' `objects`, says why it was skipped."""
    from datasets import DatasetDict
    from PIL import Image

    from analysis.transfer import analyze_transfer
    from pipeline.report import transfer_metrics
    from trainer.data import load_coco_karpathy

    images = []
    for i, colour in enumerate(("red", "blue", "green", "white")):
        filename = f"COCO_val2014_{i:012d}.jpg"
        (tmp_path / "coco" / "val2014").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), colour).save(tmp_path / "coco" / "val2014" / filename)
        sentence = {"raw": f"A {colour} wall.", "tokens": ["a", colour, "wall"], "imgid": i, "sentid": i}
        images.append(
            {"filepath": "val2014", "filename": filename, "imgid": i, "split": "test", "cocoid": i,
             "sentids": [i], "sentences": [sentence]}
        )  # fmt: skip
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    test = load_coco_karpathy(tmp_path / "dataset_coco.json", tmp_path / "coco", "test")
    DatasetDict({"test": test}).save_to_disk(str(tmp_path / "coco-dd"))

    out, _, _ = smoke
    stage3 = out / "seed0" / "ablations" / "baseline" / "stage3"
    transfer = analyze_transfer(stage3, tmp_path / "t", tmp_path / "coco-dd", name="coco", n_samples=4)
    assert transfer["samples"]["n"] == 4 and "skipped" in transfer["grounding"]
    assert set(transfer["routing_information"]["layers"]) == set(transfer["load"]["layers"])
    metrics = transfer_metrics(json.loads((tmp_path / "t" / TRANSFER_FILE).read_text()))
    assert metrics["transfer_coco_routing_mi"] == transfer["routing_information"]["mean_normalised"]
    assert "transfer_coco_crossover_increase_pct" in metrics
    assert not any("grounding" in key or "instruction" in key for key in metrics)
