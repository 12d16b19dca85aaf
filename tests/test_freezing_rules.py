"""The freezing rules (`trainer.freezing`) on a tiny model, without training: which group each parameter is in,
which router parameters can learn in each routing mode, what `apply_trainable` unfreezes and refuses, and what the
changed-parameters check reports. (tests/test_train.py checks the same rules on real training runs.)"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from modeling_moe_vlm import MoeVlmForCausalLM
from trainer.freezing import (
    apply_trainable,
    changed_params_check,
    check_groups,
    fingerprints,
    group_of,
    trainable_names,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MoeVlmForCausalLM(tiny_config())


def test_each_parameter_name_has_its_group():
    assert group_of("model.layers.1.mlp.experts.gate_up_proj") == "experts"
    assert group_of("model.layers.0.mlp.gate.weight") == "router"
    assert group_of("model.layers.0.self_attn.q_proj.weight") == "attention"
    assert group_of("model.layers.0.input_layernorm.weight") == "norms"
    assert group_of("model.norm.weight") == "norms"
    assert group_of("model.connector.linear_1.weight") == "connector"
    assert group_of("lm_head.weight") == "lm_head"
    with pytest.raises(ValueError, match="belongs to no parameter group"):
        group_of("model.something_new.weight")


def test_router_parameters_train_only_where_they_get_a_gradient(model):
    def router(mode: str, **coefs) -> set[str]:
        model.config.router_mode = mode
        for name, value in coefs.items():
            setattr(model.config, name, value)
        names = trainable_names(model, ["router"])
        for name in coefs:
            setattr(model.config, name, 0.0)
        return {n.split(".mlp.gate.")[1] for n in names}

    assert router("gumbel") == {"weight"}
    assert router("softmax") == {"weight"}
    assert router("modality_aware") == {"weight", "modality_embedding.weight", "modality_proj.weight"}
    assert router("hard") == set()  # bypassed, no router loss
    assert router("hard", router_aux_loss_coef=0.01) == {"weight"}  # bypassed, but a router loss trains it
    model.config.router_mode = "gumbel"


def test_apply_trainable_unfreezes_exactly_the_groups(model):
    names = apply_trainable(model, ["experts", "attention"])
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == set(names)
    assert grads and {group_of(n) for n in grads} == {"experts", "attention"}
    assert model.config.freeze_vision_tower
    apply_trainable(model, ["vision_tower"])
    assert not model.config.freeze_vision_tower
    model.config.freeze_vision_tower = True
    for groups, message in (([], "empty"), (["expert"], "unknown parameter group")):
        with pytest.raises(ValueError, match=message):
            check_groups(groups)
    with pytest.raises(ValueError, match=r"no parameters in group\(s\) \['mlp'\]"):
        apply_trainable(model, ["mlp"])  # the MoE model has experts, not a dense MLP


def test_the_changed_parameters_check_names_what_went_wrong(model):
    before = fingerprints(model)
    name = "model.layers.0.mlp.experts.down_proj"
    with torch.no_grad():
        model.get_parameter(name).add_(1e-3)
    after = fingerprints(model)
    assert changed_params_check(before, after, [name]) == {
        "ok": True, "n_trainable": 1, "n_changed": 1, "frozen_changed": [], "trainable_unchanged": [],
    }  # fmt: skip
    other = "model.layers.1.mlp.experts.down_proj"
    wrong = changed_params_check(before, after, [other])
    assert not wrong["ok"] and wrong["frozen_changed"] == [name] and wrong["trainable_unchanged"] == [other]
    assert changed_params_check(before, before, [])["ok"]


def test_the_check_fails_when_only_one_thing_went_wrong(model):
    """`ok` needs both: no frozen parameter changed AND every trainable one changed."""
    before = fingerprints(model)
    name, other = "model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"
    with torch.no_grad():
        model.get_parameter(name).add_(1e-3)
    after = fingerprints(model)
    lagging = changed_params_check(before, after, [name, other])  # one trainable parameter did not move
    assert not lagging["ok"] and lagging["frozen_changed"] == [] and lagging["trainable_unchanged"] == [other]
    leaked = changed_params_check(before, after, [])  # a frozen parameter moved
    assert not leaked["ok"] and leaked["frozen_changed"] == [name] and leaked["trainable_unchanged"] == []


def test_an_idle_group_is_warned_about_and_a_learning_one_is_not(model, caplog):
    model.config.router_mode = "hard"
    try:
        with caplog.at_level("WARNING", logger="moe_vlm.trainer"):
            apply_trainable(model, ["router", "experts"])
        assert "['router'] get no gradient with router_mode='hard'" in caplog.text
        caplog.clear()
        model.config.router_mode = "gumbel"
        with caplog.at_level("WARNING", logger="moe_vlm.trainer"):
            apply_trainable(model, ["router", "experts"])
        assert "get no gradient" not in caplog.text
    finally:
        model.config.router_mode = "gumbel"
        apply_trainable(model, ["experts"])
