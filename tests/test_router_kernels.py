"""`router_implementation="fused_cpp"` (modeling_moe_vlm/router_kernels.py, cpp_kernels.py): the same router as the
eager one — logits, chosen experts, weights and every gradient — in every mode, in training and eval, with dropout on
the logits and the auxiliary-free bias; selectable through the config and `from_pretrained`; clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from modeling_moe_vlm import MoeVlmConfig, MoeVlmForCausalLM, cpp_kernels
from modeling_moe_vlm.modeling_moe_vlm import MoeVlmRouter, MoeVlmSparseMoeBlock

MODES = ["hard", "gumbel", "softmax", "modality_aware"]


def _router(mode: str, dtype=torch.float64, **overrides) -> MoeVlmRouter:
    overrides.setdefault("gumbel_tau", 0.7)  # not 1, so a lost division by tau shows
    router = MoeVlmRouter(tiny_config(router_mode=mode, **overrides)).to(dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0.0, 0.3)  # logits of a few units: the tokens split between the experts
        router.expert_bias.normal_(0.0, 0.5)
    return router


def _route(router, implementation: str, x, is_image, seed: int = 1):
    """The router's outputs and the gradients of a loss that reads both the weights and the logits."""
    router.config.router_implementation = implementation
    torch.manual_seed(seed)  # the same dropout and Gumbel draws for both
    logits, weights, index = router(x, is_image)
    gen = torch.Generator().manual_seed(2)
    loss = (logits * torch.randn(logits.shape, generator=gen, dtype=logits.dtype)).sum()
    if weights.requires_grad:
        loss = loss + (weights * torch.randn(weights.shape, generator=gen, dtype=weights.dtype)).sum()
    names, params = zip(*[(n, p) for n, p in router.named_parameters()])
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return (logits, weights, index), dict(zip(("input", *names), grads))


def _assert_same_route(router, x, is_image, seed: int = 1):
    (el, ew, ei), egrads = _route(router, "eager", x, is_image, seed)
    (fl, fw, fi), fgrads = _route(router, "fused_cpp", x, is_image, seed)
    torch.testing.assert_close(fl, el)
    assert torch.equal(fi, ei), "the fused router chose other experts"
    torch.testing.assert_close(fw, ew)
    assert fw.requires_grad == ew.requires_grad and fw.dtype == ew.dtype and fi.shape == ei.shape
    for name, grad in egrads.items():
        got = fgrads[name]
        if grad is None or not grad.any():  # a parameter this mode does not use
            assert got is None or not got.any(), name
        else:
            # both compute the decision in float32 (the router's `.float()`): its rounding, not float64's
            torch.testing.assert_close(got, grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    return ei


def _tokens(n: int = 96, hidden: int = 64, dtype=torch.float64):
    x = torch.randn(n, hidden, dtype=dtype, generator=torch.Generator().manual_seed(3), requires_grad=True)
    is_image = torch.zeros(n, dtype=torch.bool)
    is_image[: n // 3] = True
    return x, is_image


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_equal_to_the_eager_router(mode, training):
    router = _router(mode).train(training)
    x, is_image = _tokens()
    index = _assert_same_route(router, x, is_image)
    assert index.unique().numel() == 2  # both experts chosen: both branches of the choice exercised


@pytest.mark.parametrize("mode", ["gumbel", "softmax", "modality_aware"])
def test_equal_with_dropout_on_the_logits_bias_and_three_experts(mode):
    router = _router(mode, router_dropout=0.3, router_bias_update_rate=0.01, num_experts=3).train()
    x, is_image = _tokens()
    for seed in range(3):  # different dropout masks and noise
        index = _assert_same_route(router, x, is_image, seed)
    assert index.unique().numel() == 3


@pytest.mark.parametrize(
    "dtype, tolerance",
    [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],  # float32: its rounding; bfloat16: its 8-bit mantissa
)
def test_equal_through_the_block_with_the_compiled_experts(dtype, tolerance):
    """The tiny CPU path as the bench runs it (float32), and in bfloat16: the fused router with sorted_top1_cpp,
    against eager both. The outputs are equal; each gradient within `tolerance` of its largest entry."""
    config = tiny_config(router_mode="gumbel", gumbel_tau=0.7)
    torch.manual_seed(0)
    block = MoeVlmSparseMoeBlock(config).train()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    block = block.to(dtype)
    x = torch.randn(2, 40, config.hidden_size, dtype=dtype, requires_grad=True)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[:, 1:11] = True
    grad_out = torch.randn_like(x)

    def run(router_impl, experts_impl):
        config.router_implementation, config._experts_implementation = router_impl, experts_impl
        torch.manual_seed(4)
        out = block(x, mask)
        params = [p for p in block.parameters()]
        return out, torch.autograd.grad(out, [x, *params], grad_out, allow_unused=True)

    expected, expected_grads = run("eager", "eager")
    got, got_grads = run("fused_cpp", "sorted_top1_cpp")
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    for want, have in zip(expected_grads, got_grads):
        if want is None:
            assert have is None or not have.any()
        else:
            scale = want.abs().max().item()
            torch.testing.assert_close(have, want, rtol=tolerance, atol=tolerance * scale)


def test_gradients_of_the_logits_by_finite_differences():
    """The logits' backward into the hidden states, the router weight and the modality term, float64, in every
    kind. (The weight's gradient goes through the decision's float32 softmax, which finite differences in float64
    cannot resolve: it is checked against the eager router's autograd above.)"""
    kernel = cpp_kernels.compiled().route_top1
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(12, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    offset = torch.randn(12, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    is_image = torch.arange(12) % 3 == 0
    for kind in (0, 1, 2, 3):

        def logits_only(x, w, offset, kind=kind):
            torch.manual_seed(0)
            return kernel(x, w, offset, None, None, is_image, 0.7, kind, 0, 1)[0]

        assert torch.autograd.gradcheck(logits_only, (x, w, offset))


def test_the_named_implementation_is_the_one_that_runs(monkeypatch):
    """The two agree to rounding, so equality alone cannot tell which ran: count the compiled kernel's calls."""
    from modeling_moe_vlm import router_kernels

    calls = []
    kernel = router_kernels._kernel

    def counted():
        calls.append(1)
        return kernel()

    monkeypatch.setattr(router_kernels, "_kernel", counted)
    router = _router("gumbel").train()
    x, is_image = _tokens()
    for implementation, expected in (("eager", 0), ("fused_cpp", 1), ("eager", 1)):
        router.config.router_implementation = implementation
        router(x, is_image)
        assert len(calls) == expected, implementation


def test_selected_through_the_config_and_from_pretrained(tmp_path):
    config = tiny_config(router_mode="gumbel")
    assert config.router_implementation == "eager"
    model = MoeVlmForCausalLM(config)
    model.save_pretrained(tmp_path)
    loaded = MoeVlmForCausalLM.from_pretrained(tmp_path, router_implementation="fused_cpp")
    assert loaded.config.router_implementation == "fused_cpp"
    assert all(
        block.gate.config.router_implementation == "fused_cpp" for block in loaded.moe_blocks().values()
    )
    ids = torch.randint(3, 1000, (2, 12))
    loaded.train()
    losses = {}
    for implementation in ("eager", "fused_cpp"):
        loaded.config.router_implementation = implementation
        torch.manual_seed(0)
        losses[implementation] = loaded(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(losses["fused_cpp"], losses["eager"])
    with pytest.raises(
        ValueError, match="router_implementation must be one of .*'eager', 'fused_cpp'.*got 'fast'"
    ):
        MoeVlmConfig(**{**config.to_dict(), "router_implementation": "fast"})


def test_unsupported_settings_get_a_clear_error():
    router = _router("gumbel", router_dropout=0.1, router_dropout_on="input").train()
    router.config.router_implementation = "fused_cpp"
    x, is_image = _tokens()
    with pytest.raises(
        ValueError, match='dropout on the logits only.*router_dropout_on="logits" or .*"eager"'
    ):
        router(x, is_image)
    router.eval()  # no dropout in eval: served
    router(x, is_image)


def test_a_failed_build_names_what_to_install(no_cpp_compiler):
    router = _router("gumbel").train()
    router.config.router_implementation = "fused_cpp"
    with pytest.raises(
        RuntimeError,
        match=r'"fused_cpp": it builds a C\+\+ extension.*build failed.*Install a C\+\+ compiler.*ninja.*'
        r'router_implementation="eager"',
    ):
        router(*_tokens())
