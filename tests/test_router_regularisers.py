"""The routing regularisers of the ablations (issue 14) beyond the paper's: Switch balancing within each modality,
a floor on each layer's routing entropy, and DeepSeek-V3's auxiliary-loss-free bias. Each is checked against its
definition (or transformers' own Switch loss), and the bias against what it must and must not touch."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from modeling_moe_vlm import MoeVlmForCausalLM, router_losses
from trainer.bias_balancing import ExpertBiasBalancer


def _inputs(processor, image, texts=("<image>\nA red circle.", "<image>\nTwo stars and a square.")):
    return processor(images=[image] * len(texts), text=list(texts), return_tensors="pt", padding=True)


def test_modality_balancing_is_switch_balancing_within_each_modality(tiny_model, processor, red_image):
    tiny_model.set_router_mode("softmax")
    inputs = _inputs(processor, red_image)
    out = tiny_model(**inputs, labels=inputs["input_ids"], output_router_logits=True)
    attention = inputs["attention_mask"]
    per_modality = [
        load_balancing_loss_func(out.router_logits, 2, 1, attention * mask)
        for mask in (out.modality_mask.long(), (~out.modality_mask).long())
    ]
    torch.testing.assert_close(
        out.modality_balancing_loss, torch.stack(per_modality).mean(), rtol=1e-5, atol=1e-6
    )
    assert not torch.isclose(out.modality_balancing_loss, out.load_balancing_loss)  # not the pooled term


def test_entropy_floor_is_the_hinge_on_each_layers_mean_routing_entropy():
    cfg = tiny_config(router_entropy_floor=0.9)
    balanced = torch.zeros(6, 2)  # every token 50 / 50: entropy log 2, above any floor
    collapsed = torch.tensor([[8.0, -8.0]]).repeat(6, 1)  # every token to expert 0: entropy ~0
    index = lambda lg: lg.argmax(-1, keepdim=True)  # noqa: E731
    modality = torch.tensor([[True, False, False, False, False, False]])
    terms = router_losses((balanced, collapsed), (index(balanced), index(collapsed)), modality, None, cfg)
    p = torch.tensor([8.0, -8.0]).softmax(-1)
    entropy = -(p * p.log()).sum()
    expected = (0.0 + (0.9 * math.log(2) - entropy)) / 2  # mean over the two layers
    torch.testing.assert_close(terms["entropy_floor_loss"], expected.float())
    # the floor never reads the modality: relabelling the tokens changes nothing
    other = router_losses((balanced, collapsed), (index(balanced), index(collapsed)), ~modality, None, cfg)
    torch.testing.assert_close(other["entropy_floor_loss"], terms["entropy_floor_loss"])
    assert not torch.equal(other["specialisation_loss"], terms["specialisation_loss"])  # which does read it


@pytest.mark.parametrize(
    "coef, term",
    [
        ("router_modality_aux_loss_coef", "modality_balancing_loss"),
        ("router_entropy_loss_coef", "entropy_floor_loss"),
    ],
)
def test_new_router_losses_enter_the_loss_by_their_coefficient(processor, red_image, coef, term):
    torch.manual_seed(0)
    model = MoeVlmForCausalLM(tiny_config(router_mode="softmax", router_entropy_floor=1.0)).eval()
    inputs = _inputs(processor, red_image)
    plain = model(**inputs, labels=inputs["input_ids"])
    setattr(model.config, coef, 0.5)
    weighted = model(**inputs, labels=inputs["input_ids"])
    assert getattr(weighted, term) > 0
    torch.testing.assert_close(weighted.loss, plain.loss + 0.5 * getattr(weighted, term))


@pytest.mark.parametrize(
    "field", ["router_modality_aux_loss_coef", "router_entropy_loss_coef", "router_bias_update_rate"]
)
def test_negative_regulariser_fields_are_refused(field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: -0.1})


def test_entropy_floor_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="router_entropy_floor"):
        tiny_config(router_entropy_floor=1.5)


@pytest.mark.parametrize("mode", ["gumbel", "softmax", "modality_aware"])
def test_expert_bias_moves_the_decision_not_the_logits(processor, red_image, mode):
    torch.manual_seed(0)
    model = MoeVlmForCausalLM(tiny_config(router_mode=mode)).eval()
    inputs = _inputs(processor, red_image)
    before = model(**inputs, output_router_logits=True)
    model.set_router_bias_update_rate(0.001)
    for block in model.moe_blocks().values():
        block.gate.expert_bias.copy_(torch.tensor([-50.0, 50.0]))  # far beyond any logit: expert 1 everywhere
    after = model(**inputs, output_router_logits=True)
    # the first MoE layer reads the same hidden states: its recorded logits are what the router says, unbiased
    torch.testing.assert_close(after.router_logits[0], before.router_logits[0])
    assert all((chosen == 1).all() for chosen in after.router_indices)
    model.set_router_bias_update_rate(0.0)  # off: the bias is neither added nor saved
    off = model(**inputs, output_router_logits=True)
    assert all(torch.equal(a, b) for a, b in zip(off.router_indices, before.router_indices))
    assert not any(k.endswith("expert_bias") for k in model.state_dict())


def test_expert_bias_is_saved_only_when_used_and_loads_back(tmp_path):
    torch.manual_seed(0)
    plain = MoeVlmForCausalLM(tiny_config(router_mode="gumbel"))
    assert not any(
        k.endswith("expert_bias") for k in plain.state_dict()
    )  # checkpoints without it stay as they were
    plain.set_router_bias_update_rate(0.01)
    for i, block in enumerate(plain.moe_blocks().values()):
        block.gate.expert_bias.copy_(torch.tensor([0.25 * (i + 1), -0.25 * (i + 1)]))
    plain.save_pretrained(tmp_path)
    loaded = MoeVlmForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.router_bias_update_rate == 0.01
    for a, b in zip(plain.moe_blocks().values(), loaded.moe_blocks().values()):
        torch.testing.assert_close(b.gate.expert_bias, a.gate.expert_bias)


def test_balancer_moves_each_layers_bias_against_its_observed_load():
    torch.manual_seed(0)
    model = MoeVlmForCausalLM(tiny_config(router_mode="gumbel", moe_layers=[0, 1]))
    model.set_router_bias_update_rate(0.1)
    balancer = ExpertBiasBalancer([0, 1], 2, rate=0.1)
    # layer 0: 3 tokens to expert 0, 1 to expert 1 (the last token of the second row is padding, sent to expert 1)
    layer0 = torch.tensor([[0], [0], [0], [1], [1], [1]])
    layer1 = torch.tensor(
        [[1], [1], [0], [1], [0], [0]]
    )  # 2 vs 3 after padding: expert 1 overloaded? no: 2 / 3
    attention = torch.tensor([[1, 1, 1], [1, 1, 0]])
    balancer.observe((layer0, layer1), attention)
    balancer.observe(
        (layer0[:, :0].new_zeros(6, 1), layer1), attention
    )  # a second micro-batch of the same step
    balancer.step(model)
    bias = {i: b.gate.expert_bias.tolist() for i, b in model.moe_blocks().items()}
    # layer 0: expert 0 got 3 + 5 = 8 tokens, expert 1 got 2 + 0 = 2 -> expert 0's bias down, expert 1's up
    assert bias[0] == pytest.approx([-0.1, 0.1])
    # layer 1: expert 0 got 2 + 2 = 4, expert 1 got 3 + 3 = 6 -> expert 0's bias up, expert 1's down
    assert bias[1] == pytest.approx([0.1, -0.1])
    assert balancer.counts.sum() == 0  # the next step counts afresh
    balancer.step(model)  # a step that saw no tokens moves nothing
    assert {i: b.gate.expert_bias.tolist() for i, b in model.moe_blocks().items()} == bias


def test_a_regulariser_the_checkpoints_code_lacks_is_refused_not_ignored():
    """A checkpoint runs the modeling code saved with it: code from before a field would take it and ignore it."""
    from types import SimpleNamespace

    from trainer.recipes import StageArguments
    from trainer.stages import MoeVlmStageTrainer

    class OldConfig:  # a config class of the code before the regularisers
        router_aux_loss_coef = 0.0

    old = SimpleNamespace(config=OldConfig())
    args = StageArguments(stage="3", router_bias_update_rate=0.001, router_entropy_loss_coef=0.5)
    with pytest.raises(
        ValueError, match=r"\['router_entropy_loss_coef', 'router_bias_update_rate'\].*predates"
    ):
        MoeVlmStageTrainer.check_model_supports(old, args)
    MoeVlmStageTrainer.check_model_supports(old, StageArguments(stage="3"))  # nothing new asked: fine
    current = MoeVlmForCausalLM(tiny_config())
    MoeVlmStageTrainer.check_model_supports(current, args)
