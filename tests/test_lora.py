"""LoRA stages (`moe-vlm train --lora_r`) and `moe-vlm merge`, through the real CLI on the tiny preset: adapters go
only where the stage trains, only they (and the fully trained router) change, the merged model computes the adapter
model's logits and loads as a plain stage directory, and bad LoRA settings are refused naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import make_shapes, make_stage0, quick_args, train
from transformers import TrainerCallback

from configuration.contract import ADAPTER_WEIGHTS_FILE, COMPLETION_MARKER
from moe_vlm_cli import main


class ParamsAtStartAndEnd(TrainerCallback):
    def __init__(self, store: dict):
        self.store = store

    def _keep(self, key, model):
        self.store[key] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._keep("start", model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._keep("end", model)


def cli_train(stage, out, from_dir, shapes, *extra, steps=4):
    argv = [
        "train",
        "--stage",
        stage,
        "--out",
        str(out),
        "--from",
        str(from_dir),
        *quick_args(shapes, steps=steps),
    ]
    return main([*argv, *extra])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    work = tmp_path_factory.mktemp("lora")
    shapes = make_shapes(work / "shapes")
    d = {"shapes": shapes, "0": make_stage0(work / "stage0")}
    assert cli_train("1", work / "stage1", d["0"], shapes, steps=2) == 0
    d["1"] = work / "stage1"
    lora = ["--lora_r", "4", "--lora_alpha", "8"]
    d["lora2"] = work / "lora2"
    assert cli_train("2", d["lora2"], d["1"], shapes, *lora) == 0
    # Stage 3 through `trainer.run.run` (what the CLI calls), with a callback that keeps every parameter of the
    # model the Trainer trains at its start and end.
    d["lora3"], d["params3"] = work / "lora3", {}
    train("3", d["lora3"], d["1"], quick_args(shapes) + lora, callbacks=[ParamsAtStartAndEnd(d["params3"])])
    for stage in ("2", "3"):
        d[f"merged{stage}"] = work / f"merged{stage}"
        assert main(["merge", "--adapter", str(d[f"lora{stage}"]), "--out", str(d[f"merged{stage}"])]) == 0
    return d


def _marker(directory):
    return json.loads((directory / COMPLETION_MARKER).read_text())


# What each stage adapts (its trainable groups, trainer.freezing) and what it trains fully.
EXPECTED = {"2": (["experts"], []), "3": (["experts", "attention"], ["router"])}


@pytest.mark.parametrize("stage", ["2", "3"])
def test_a_lora_stage_changes_only_its_adapters(dirs, stage):
    from trainer.freezing import group_of

    targets, full = EXPECTED[stage]
    record = _marker(dirs[f"lora{stage}"])
    assert record["adapter"]["targets"] == targets and record["adapter"]["fully_trained"] == full
    assert record["adapter"]["base"] == str(dirs["1"])
    # Every parameter in memory (base weights and adapters), fingerprinted before and after training.
    check = record["changed_params_check"]
    assert check["ok"], check
    assert check["frozen_changed"] == [] and check["n_changed"] == check["n_trainable"] > 0
    # The directory holds adapters (and the fully trained router copies) only, and the adapters moved off their
    # zero-initialised B.
    saved = load_file(str(dirs[f"lora{stage}"] / ADAPTER_WEIGHTS_FILE))
    others = {group_of(n.removeprefix("base_model.model.")) for n in saved if "lora_" not in n}
    assert others == set(full), others
    lora_b = [t for name, t in saved.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)
    # The merged model against its base: every weight outside the adapted / fully trained groups is exactly equal.
    base = load_file(str(dirs["1"] / "model.safetensors"))
    merged = load_file(str(dirs[f"merged{stage}"] / "model.safetensors"))
    assert set(merged) == set(base)
    changed = {group_of(name) for name in base if not torch.equal(base[name], merged[name])}
    assert changed == set(targets) | set(full), changed


def test_every_base_weight_is_exactly_unchanged_and_every_adapter_moved(dirs):
    start, end = dirs["params3"]["start"], dirs["params3"]["end"]
    adapters = {n for n in start if "lora_" in n}
    full = {n for n in start if ".modules_to_save." in n}
    assert adapters and full  # experts / attention adapters; the router's trained copy
    for name in start:
        if name in adapters:
            if "lora_B" in name:  # A starts random, B at zero: the update B A starts at zero and must move
                assert not torch.equal(start[name], end[name]), name
        elif name not in full:
            assert torch.equal(start[name], end[name]), name
    assert any(not torch.equal(start[n], end[n]) for n in full)


def test_the_merged_model_computes_the_adapter_models_logits(dirs, processor, red_image):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.data import MoeVlmCollator

    base = AutoModelForCausalLM.from_pretrained(dirs["1"], trust_remote_code=True)
    adapted = PeftModel.from_pretrained(base, str(dirs["lora3"])).eval()
    merged = AutoModelForCausalLM.from_pretrained(dirs["merged3"], trust_remote_code=True).eval()
    assert type(merged).__name__ == "MoeVlmForCausalLM"
    merged.config.router_mode = adapted.config.router_mode  # both route in eval mode, no Gumbel noise
    batch = MoeVlmCollator(processor)(
        [
            {"image": red_image, "caption": "A red circle."},
            {"image": red_image, "caption": "A big red shape."},
        ]
    )
    assert (batch["input_ids"] == merged.config.image_token_id).any()
    with torch.no_grad():
        a = adapted(**batch, output_router_logits=True)
        m = merged(**batch, output_router_logits=True)
    torch.testing.assert_close(m.logits, a.logits, atol=1e-5, rtol=1e-5)
    # The routing path runs on the merged model and takes the same decisions.
    for index_a, index_m in zip(a.router_indices, m.router_indices, strict=True):
        assert torch.equal(index_a, index_m)
    assert _marker(dirs["merged3"])["merged_from"] == str(dirs["lora3"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora_r", "4", "--lora_targets", "experts,mlp"], "lora_targets: unknown target(s) ['mlp']"),
        (["--lora_r", "0"], "lora_r must be >= 1"),
        (["--lora_targets", "experts"], "lora_r is not"),
        # Stage 2 trains the experts only: an adapter on attention would train what the stage freezes.
        (["--lora_r", "4", "--lora_targets", "attention"], "not trained by this stage"),
    ],
)
def test_bad_lora_settings_are_refused_naming_the_field(dirs, tmp_path, capsys, extra, message):
    assert cli_train("2", tmp_path / "out", dirs["1"], dirs["shapes"], *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / COMPLETION_MARKER).exists()


def test_a_stage_cannot_start_from_an_adapter_directory(dirs, tmp_path, capsys):
    assert cli_train("3", tmp_path / "out", dirs["lora2"], dirs["shapes"]) == 2
    assert "moe-vlm merge --adapter" in capsys.readouterr().err


def test_the_paper_lora_recipe_keeps_stage_3_and_adds_adapters(tmp_path):
    from trainer.recipes import parse_recipe, recipe_path

    lora = parse_recipe(
        "3",
        tmp_path,
        recipe=str(recipe_path("3", "paper").with_name("stage3_lora.yaml")),
        overrides=["--use_cpu", "true"],
    )
    full = parse_recipe("3", tmp_path, recipe="paper", overrides=["--use_cpu", "true"])
    assert (lora.stage.lora_r, lora.stage.lora_alpha, lora.stage.lora_targets) == (
        64,
        128,
        ["experts", "attention"],
    )
    assert lora.stage.trainable == full.stage.trainable and lora.stage.router_mode == full.stage.router_mode
    assert lora.stage.router_aux_loss_coef == 0.0
