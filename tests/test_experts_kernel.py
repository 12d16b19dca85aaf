"""The `sorted_top1` experts kernel and its compiled twin `sorted_top1_cpp` (modeling_moe_vlm/experts_kernels.py):
selectable by name through transformers' experts interface, and the same function as transformers' eager experts —
outputs and every gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from modeling_moe_vlm import MoeVlmForCausalLM, experts_kernels
from modeling_moe_vlm.experts_kernels import CPP_KERNEL_NAME, KERNEL_NAME
from modeling_moe_vlm.modeling_moe_vlm import MoeVlmSparseMoeBlock


def _block(mode: str, dtype=torch.float64, **overrides) -> MoeVlmSparseMoeBlock:
    config = tiny_config(router_mode=mode, **overrides)
    torch.manual_seed(0)
    block = MoeVlmSparseMoeBlock(config).to(dtype).train()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)  # experts that differ, routers that split the tokens
    return block


def _run(block, kernel: str, x, mask, grad_out):
    block.experts.config._experts_implementation = kernel
    torch.manual_seed(1)  # the same Gumbel noise for each kernel
    out = block(x, mask)
    names, params = zip(*[(n, p) for n, p in block.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(out, [x, *params], grad_out, allow_unused=True)
    return out, dict(zip(("input", *names), grads))


OURS = [KERNEL_NAME, CPP_KERNEL_NAME]


@pytest.mark.parametrize("kernel", OURS)
@pytest.mark.parametrize("mode", ["hard", "gumbel", "softmax", "modality_aware"])
def test_outputs_and_gradients_equal_eager(mode, kernel):
    block = _block(mode)
    x = torch.randn(3, 20, block.gate.weight.shape[-1], dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[:, 1:9] = True
    grad_out = torch.randn_like(x)
    expected, expected_grads = _run(block, "eager", x, mask, grad_out)
    got, got_grads = _run(block, kernel, x, mask, grad_out)
    torch.testing.assert_close(got, expected)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        if grad is None:  # a router parameter that gets no gradient in this mode gets none from either kernel
            assert got_grads[name] is None or not got_grads[name].any(), name
        else:
            torch.testing.assert_close(got_grads[name], grad, msg=lambda m, n=name: f"{n}: {m}")
    # both experts really took tokens, so the per-expert segments were exercised
    index = block.gate(x.detach().reshape(-1, x.shape[-1]), mask.reshape(-1))[2]
    assert index.unique().numel() == 2


@pytest.mark.parametrize("kernel", OURS)
def test_gradcheck_through_the_kernel_with_an_expert_that_gets_no_token(kernel):
    """torch's numerical gradient check on every input, routing weights included; all tokens on expert 1, so expert
    0's weight gradient must be exactly zero."""
    apply = (
        experts_kernels._SortedTop1Experts.apply
        if kernel == KERNEL_NAME
        else experts_kernels._compiled().sorted_top1
    )

    torch.manual_seed(0)
    tokens, hidden, inter, experts = 7, 6, 4, 2
    x = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(tokens, dtype=torch.float64, requires_grad=True)
    gate_up = torch.randn(experts, 2 * inter, hidden, dtype=torch.float64, requires_grad=True)
    down = torch.randn(experts, hidden, inter, dtype=torch.float64, requires_grad=True)
    for ids in (torch.tensor([1, 0, 1, 1, 0, 0, 1]), torch.ones(tokens, dtype=torch.long)):
        assert torch.autograd.gradcheck(
            lambda *a, ids=ids: apply(a[0], ids, *a[1:]), (x, weights, gate_up, down)
        )
    out = apply(x, torch.ones(tokens, dtype=torch.long), weights, gate_up, down)
    grad_gate_up, grad_down = torch.autograd.grad(out.sum(), [gate_up, down])
    assert not grad_gate_up[0].any() and not grad_down[0].any() and grad_down[1].any()


@pytest.mark.parametrize("kernel", OURS)
def test_selected_by_name_through_transformers(tmp_path, processor, red_image, kernel):
    torch.manual_seed(0)
    model = MoeVlmForCausalLM(tiny_config(router_mode="softmax")).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path)
    inputs = dict(processor(images=[red_image], text=["<image>\nA red circle."], return_tensors="pt"))
    loaded = MoeVlmForCausalLM.from_pretrained(tmp_path, experts_implementation=kernel).eval()
    assert loaded.config._experts_implementation == kernel
    with torch.no_grad():
        ours = loaded(**inputs).logits
        loaded.set_experts_implementation("eager")
        eager = loaded(**inputs).logits
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", OURS)
def test_top2_routing_gets_a_clear_error(kernel):
    block = _block("softmax", dtype=torch.float32, num_experts_per_tok=2)
    block.experts.config._experts_implementation = kernel
    with pytest.raises(
        ValueError, match=f'"{kernel}" serves top-1 routing only.*num_experts_per_tok=1 or use grouped_mm'
    ):
        block(torch.randn(1, 4, block.gate.weight.shape[-1]))


def test_a_failed_build_of_the_compiled_kernel_names_what_to_install(no_cpp_compiler):
    """No compiler (or no ninja): selecting `sorted_top1_cpp` says what to install and which kernel needs neither,
    instead of torch's build log."""
    block = _block("hard", dtype=torch.float32)
    block.experts.config._experts_implementation = CPP_KERNEL_NAME
    with pytest.raises(
        RuntimeError,
        match=r'"sorted_top1_cpp": it builds a C\+\+ extension.*build failed \(CalledProcessError.*'
        r"Install a C\+\+ compiler.*ninja.*"
        r'experts_implementation="sorted_top1", the same kernel',
    ):
        block(torch.randn(1, 4, block.gate.weight.shape[-1]), torch.zeros(1, 4, dtype=torch.bool))
