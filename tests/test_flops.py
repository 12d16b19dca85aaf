"""The analytic step FLOPs (`trainer.flops`) against `torch.utils.flop_counter`, which counts the matmuls that really
run: on the eager attention and eager experts paths (where every matmul has a formula and no expert computes a
token it was not sent) the two must agree, forward and backward, for every stage's trainable set."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from configuration import load_preset
from trainer.flops import generation_flops, matmul_rate, step_flops
from trainer.freezing import apply_trainable


def _model(router_mode: str, moe_layers=None):
    from modeling_moe_vlm import MoeVlmConfig, MoeVlmForCausalLM

    preset = load_preset("tiny")
    fields = {
        **preset["mistral_config"],
        **preset["moe_vlm"],
        "num_hidden_layers": 2,
        "router_mode": router_mode,
    }
    if moe_layers is not None:
        fields["moe_layers"] = moe_layers
    config = MoeVlmConfig(**fields)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = MoeVlmForCausalLM(config).train()
    model.set_experts_implementation("eager")
    return model


def _batch(model, text: int = 20, labelled: int = 12) -> dict:
    config = model.config
    n_image = config.num_image_tokens
    ids = torch.randint(1000, config.vocab_size, (2, 1 + n_image + text))
    ids[:, 1 : 1 + n_image] = config.image_token_id
    labels = ids.clone()
    labels[:, : ids.shape[1] - labelled] = -100
    size = config.vision_config.image_size
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(2, 3, size, size)}


def _counted(model, batch, backward: bool = True) -> int:
    with FlopCounterMode(display=False) as counter:
        loss = model(**batch).loss
        if backward:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    ("router_mode", "groups"),
    [
        (
            "hard",
            ["connector", "attention"],
        ),  # Stage 1 (tiny): input gradients through frozen experts and head
        ("hard", ["experts"]),  # Stage 2: nothing below layer 0 trains
        ("gumbel", ["router", "attention", "experts"]),  # Stage 3: the router's gate carries a gradient
        ("gumbel", ["embeddings", "attention", "norms", "router", "experts", "lm_head", "connector"]),
    ],
)
def test_step_flops_equal_the_counted_matmuls(router_mode, groups):
    model = _model(router_mode)
    apply_trainable(model, groups)
    batch = _batch(model)
    assert step_flops(model, batch) == pytest.approx(_counted(model, batch), rel=1e-9)


def test_forward_flops_and_the_dense_model():
    model = _model("hard")
    apply_trainable(model, ["experts"])
    batch = _batch(model)
    with torch.no_grad():
        assert step_flops(model, batch, backward=False) == pytest.approx(
            _counted(model, batch, False), rel=1e-9
        )
    # A top-1 MoE is credited with its dense model plus the routers: hidden x experts per token per layer.
    dense = _model("hard", moe_layers=[])
    apply_trainable(dense, ["mlp"])
    routers = 2 * model.config.hidden_size * model.config.num_experts * batch["input_ids"].numel() * 2
    assert step_flops(model, batch, backward=False) - step_flops(dense, batch, backward=False) == routers


def test_head_flops_follow_the_labelled_positions():
    model = _model("hard")
    batch = _batch(model, labelled=12)
    fewer = _batch(model, labelled=4)
    config = model.config
    # all trainable: forward + weight gradient + input gradient of the head, 2 x 8 fewer rows
    assert (
        step_flops(model, batch) - step_flops(model, fewer) == 6 * config.hidden_size * config.vocab_size * 16
    )


def test_generation_flops_grow_with_the_context():
    model = _model("hard").eval()
    prompt = _batch(model)
    prompt.pop("labels")
    one, two = generation_flops(model, prompt, 1), generation_flops(model, prompt, 2)
    assert one == step_flops(model, prompt, backward=False, rows=2)
    assert two > 2 * (two - one) > 0  # the prefill dominates a short continuation


def test_matmul_rate_is_a_plausible_rate():
    rate = matmul_rate(size=256, seconds=0.05)
    assert 1e8 < rate < 1e14


def test_onednn_matmul_rate_times_the_same_product():
    """The oneDNN reference rate times oneDNN's linear on dense tensors: a plausible rate, and the op it times
    computes the product torch.mm does (a @ w.T), so the two rates divide the same FLOPs."""
    from trainer.flops import _onednn_linear

    with pytest.raises(ValueError, match="backend='mkl' is not one of"):
        matmul_rate(size=8, backend="mkl")
    linear = _onednn_linear()
    if linear is None:
        assert matmul_rate(size=64, seconds=0.01, backend="onednn") is None
        return
    # as large as the torch test's product: a 48 x 32 x 80 one fell under the floor on a loaded machine
    rate = matmul_rate(size=256, seconds=0.05, backend="onednn")
    assert 1e8 < rate < 1e14
    a, w = torch.randn(48, 32), torch.randn(80, 32)
    torch.testing.assert_close(linear(a, w, None, "none", [], ""), a @ w.T)
