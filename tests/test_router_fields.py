"""Router config fields (init std, dropout and where it acts), their recipe values, and the routers' own learning
rate (an optimizer param group of their own)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import tiny_config

from modeling_moe_vlm import MoeVlmConfig, MoeVlmForCausalLM
from modeling_moe_vlm.modeling_moe_vlm import MoeVlmRouter

# ----- init std -------------------------------------------------------------------------------------------------------


def _router_weights(**fields) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    # A wide model: the router weight has 2 x 1024 entries, so its sample std is within ~2 % of the true one.
    config = tiny_config(hidden_size=1024, intermediate_size=64, router_mode="modality_aware", **fields)
    gate = MoeVlmForCausalLM(config).model.layers[0].mlp.gate
    return gate.weight.detach(), gate.modality_proj.weight.detach()


@pytest.mark.parametrize("std", [0.05, 0.3])
def test_router_init_std_reaches_the_router_weights(std):
    weight, proj = _router_weights(router_init_std=std, modality_embed_dim=512)
    assert weight.std().item() == pytest.approx(std, rel=0.06)
    assert weight.mean().abs().item() < 4 * std / weight.numel() ** 0.5
    assert proj.std().item() == pytest.approx(std, rel=0.06)  # the modality_aware term is the router's too


def test_unset_router_init_std_is_initializer_range_and_is_recorded():
    config = tiny_config()
    assert config.router_init_std == config.initializer_range == 0.02
    weight, _ = _router_weights()
    assert weight.std().item() == pytest.approx(0.02, rel=0.06)
    # Other weights keep initializer_range whatever the router's std.
    torch.manual_seed(0)
    model = MoeVlmForCausalLM(tiny_config(hidden_size=256, intermediate_size=64, router_init_std=0.3))
    assert model.model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_configs_saved_before_the_fields_load_with_todays_behaviour(tmp_path):
    config = tiny_config()
    saved = config.to_dict()
    for name in ("router_init_std", "router_dropout_on"):
        saved.pop(name)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = MoeVlmConfig.from_pretrained(tmp_path)
    assert loaded.router_init_std == loaded.initializer_range
    assert loaded.router_dropout == 0.0 and loaded.router_dropout_on == "logits"
    # A round trip keeps the fields.
    config = tiny_config(router_init_std=0.05, router_dropout=0.1, router_dropout_on="input")
    config.save_pretrained(tmp_path / "new")
    again = MoeVlmConfig.from_pretrained(tmp_path / "new")
    assert (again.router_init_std, again.router_dropout, again.router_dropout_on) == (0.05, 0.1, "input")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"router_dropout_on": "weights"}, "router_dropout_on"),
        ({"router_init_std": -0.1}, "router_init_std"),
        ({"router_dropout": 1.0}, "router_dropout"),
    ],
)
def test_bad_router_fields_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


# ----- dropout --------------------------------------------------------------------------------------------------------


def _router(mode: str, p: float, on: str = "logits") -> tuple[MoeVlmRouter, torch.Tensor, torch.Tensor]:
    config = tiny_config(router_mode=mode, router_dropout=p, router_dropout_on=on)
    torch.manual_seed(0)
    router = MoeVlmRouter(config)
    torch.nn.init.normal_(router.weight, std=1.0)
    hidden = torch.randn(400, config.hidden_size)
    return router, hidden, torch.zeros(400, dtype=torch.bool)


def test_router_dropout_acts_on_the_logits_and_only_in_training():
    p = 0.5
    router, hidden, is_image = _router("softmax", p)
    clean = F.linear(hidden, router.weight)  # (tokens, 2)
    router.eval()
    logits, weights, index = router(hidden, is_image)
    assert torch.equal(logits, clean)
    torch.testing.assert_close(weights[:, 0], clean.softmax(-1).max(-1).values)  # eval: no dropout
    router.train()
    torch.manual_seed(1)
    logits, weights, index = router(hidden, is_image)
    assert torch.equal(logits, clean)  # the returned logits are the router's own, never dropped
    # Every token's decision is the softmax of its logits with each one either zeroed or scaled by 1 / (1 - p):
    # dropout on the logits, nothing else.
    candidates = torch.stack(
        [
            (clean * torch.tensor(keep) / (1 - p)).softmax(-1)
            for keep in itertools.product((0.0, 1.0), repeat=2)
        ]
    )  # (4, tokens, 2)
    chosen = candidates.gather(-1, index.expand(4, -1, -1))[..., 0]  # (4, tokens)
    assert ((chosen - weights[:, 0]).abs() < 1e-5).any(0).all()
    plain = clean.softmax(-1).gather(-1, index)[:, 0]
    assert (plain - weights[:, 0]).abs().max() > 1e-3  # and it did drop some


def test_router_dropout_on_the_input_differs_and_gumbel_logits_stay_clean():
    router, hidden, is_image = _router("softmax", 0.5, on="input")
    router.train()
    torch.manual_seed(1)
    _, weights, _ = router(hidden, is_image)
    clean = F.linear(hidden, router.weight)
    # Input dropout moves every token's logits off the four logit-dropout patterns.
    candidates = torch.stack(
        [
            (clean * torch.tensor(keep) / 0.5).softmax(-1).max(-1).values
            for keep in itertools.product((0.0, 1.0), repeat=2)
        ]
    )
    assert not ((candidates - weights[:, 0]).abs() < 1e-5).any(0).all()
    router, hidden, is_image = _router("gumbel", 0.3)
    router.train()
    logits, weights, index = router(hidden, is_image)
    assert torch.equal(logits, F.linear(hidden, router.weight)) and torch.equal(
        weights, torch.ones_like(weights)
    )


def test_router_dropout_is_read_at_call_time():
    router, hidden, is_image = _router("softmax", 0.0)
    router.train()
    _, before, _ = router(hidden, is_image)
    router.config.router_dropout = 0.5  # as a stage sets it on a loaded model
    torch.manual_seed(1)
    _, after, _ = router(hidden, is_image)
    assert not torch.allclose(before, after)


# ----- recipes ----------------------------------------------------------------------------------------------------


def tiny_lr(tmp_path) -> float:
    from trainer.recipes import parse_recipe

    return parse_recipe("3", tmp_path).training.learning_rate


def test_paper_recipes_carry_the_authors_router_values(tmp_path):
    from configuration.presets import load_preset
    from trainer.recipes import parse_recipe

    preset = load_preset("paper")["moe_vlm"]
    assert preset["router_init_std"] == 0.05 and preset["router_dropout_on"] == "logits"
    paper = parse_recipe("3", tmp_path, recipe="paper", overrides=["--use_cpu", "true"]).stage
    assert paper.router_dropout == 0.1
    tiny = parse_recipe("3", tmp_path).stage
    # the tiny chain: the model's router dropout (0), and the routers on 10x the stage's learning rate
    assert tiny.router_dropout is None and tiny.router_learning_rate == 10 * tiny_lr(tmp_path)
    assert "router_init_std" not in load_preset("tiny")["moe_vlm"]
    override = parse_recipe(
        "3", tmp_path, overrides=["--router_learning_rate", "1e-2", "--routing_probe_split", "none"]
    )
    assert override.stage.router_learning_rate == 1e-2 and override.stage.routing_probe_split is None


def test_stage_sets_router_dropout_on_the_model(tiny_model, tmp_path):
    from trainer.recipes import StageArguments
    from trainer.stages import UnifiedFinetuneTrainer

    trainer = UnifiedFinetuneTrainer(
        model=tiny_model, args=_args(tmp_path), stage_args=StageArguments(stage="3", router_dropout=0.1)
    )
    assert trainer.model.config.router_dropout == 0.1
    with pytest.raises(ValueError, match="router_dropout"):
        StageArguments(stage="3", router_dropout=1.5)
    with pytest.raises(ValueError, match="router_learning_rate"):
        StageArguments(stage="3", router_learning_rate=0.0)


# ----- the routers' learning rate ----------------------------------------------------------------------------------


def _args(out, **fields):
    from transformers import TrainingArguments

    values = dict(
        output_dir=str(out),
        learning_rate=1e-4,
        weight_decay=0.1,
        optim="adamw_torch_fused",
        lr_scheduler_type="cosine",
        warmup_steps=2,
        max_steps=10,
        use_cpu=True,
        report_to="none",
    )
    values.update(fields)
    return TrainingArguments(**values)


@pytest.mark.parametrize("router_lr", [None, 3e-3])
def test_router_param_group_gets_its_learning_rate(tiny_model, tmp_path, router_lr):
    from trainer.recipes import StageArguments
    from trainer.stages import UnifiedFinetuneTrainer

    stage_args = StageArguments(stage="3", router_learning_rate=router_lr)
    trainer = UnifiedFinetuneTrainer(model=tiny_model, args=_args(tmp_path), stage_args=stage_args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    optimizer = trainer.optimizer
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    grouped = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)  # every trainable parameter, exactly once
    routers = [g for g in optimizer.param_groups if g.get("name") == "router"]
    if router_lr is None:
        assert routers == [] and {g["lr"] for g in optimizer.param_groups} == {0.0}  # warmup starts at 0
        return
    assert routers and optimizer.param_groups[-1] is routers[-1]  # last: `learning_rate` logs the first group
    assert {names[id(p)] for g in routers for p in g["params"]} == {
        n for n in trainable if n.endswith("mlp.gate.weight")
    }
    assert {g["initial_lr"] for g in routers} == {router_lr}
    assert {g["initial_lr"] for g in optimizer.param_groups if g not in routers} == {1e-4}
    # Decay follows the Trainer's own rule (the router weight decays, as a Linear weight would).
    assert {g["weight_decay"] for g in routers} == {0.1}
    # The schedule scales both rates alike.
    for _ in range(4):
        optimizer.step()
        trainer.lr_scheduler.step()
    rates = [g["lr"] for g in optimizer.param_groups]
    assert rates[-1] / rates[0] == pytest.approx(router_lr / 1e-4)


def test_router_learning_rate_without_a_trainable_router_is_refused(tiny_model, tmp_path):
    from trainer.recipes import StageArguments
    from trainer.stages import UnifiedFinetuneTrainer

    stage_args = StageArguments(stage="3", trainable=["attention"], router_learning_rate=1e-3)
    trainer = UnifiedFinetuneTrainer(model=tiny_model, args=_args(tmp_path), stage_args=stage_args)
    with pytest.raises(ValueError, match="no trainable router parameter"):
        trainer.create_optimizer()


def test_written_recipe_keeps_the_router_fields(tmp_path):
    from trainer.recipes import parse_recipe, resolved_recipe

    recipe = parse_recipe(
        "3", tmp_path, overrides=["--router_learning_rate", "2e-3", "--router_dropout", "0.1"]
    )
    values = yaml.safe_load(yaml.safe_dump(resolved_recipe(recipe)))
    assert values["router_learning_rate"] == 2e-3 and values["router_dropout"] == 0.1
    assert values["routing_probe_split"] == "validation" and values["routing_probe_samples"] == 32
