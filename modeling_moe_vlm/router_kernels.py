"""`router_implementation="fused_cpp"`: the router's top-1 decision as one compiled autograd node (`route_top1` in
`cpp_kernels.py`), beside the default `"eager"` (the router's PyTorch code in `MoeVlmRouter`).

Why: at the embedded default's size the straight-through Gumbel router is ~15 small aten calls on a (tokens, 2)
tensor, and their per-call overhead (about 0.45 ms forward + backward at 512 tokens, an eighth of the dense MLP;
README, Benchmarks) is what keeps the MoE block above the dense MLP once the experts kernel costs what the MLP does.
Compiled, the logits' use, the choice and the weight are one pass over the tokens, and the backward one more pass
and two matmuls.

The same function as the eager router (tests/test_router_kernels.py): the same logits, the same experts chosen and
the same weights, and the same gradients, in every router mode, with dropout on the logits and the auxiliary-free
bias. The random draws are the eager router's (`bernoulli_` for dropout, then one `exponential_` for the Gumbel
noise, in that order, on tensors of the same shape), so a seed gives the same routing. Not bit-identical: the dot
products and the softmax's `exp` round in their own order (differences of float32 rounding; the noise's `log` is
aten's, as the eager router's). The eager router stays the default, so the published results are computed by it.

Scope: CPU tensors (on another device the eager router runs; not measured there: no GPU was lent) and dropout on
the logits (`router_dropout_on="input"` with dropout in training raises).
"""

from __future__ import annotations

import torch

from .configuration_moe_vlm import ROUTER_IMPLEMENTATIONS
from .cpp_kernels import compiled_for

EAGER, FUSED = ROUTER_IMPLEMENTATIONS

# route_top1's `kind` (cpp_kernels.py, RouteKind)
_STRAIGHT_THROUGH_GUMBEL, _ARGMAX, _SOFTMAX, _MODALITY = 0, 1, 2, 3


def _kernel():
    return compiled_for(
        f'router_implementation="{FUSED}"', f'router_implementation="{EAGER}" (the default)'
    ).route_top1


def fused_route(router: torch.nn.Module, hidden_states: torch.Tensor, is_image: torch.Tensor):
    """`MoeVlmRouter.forward`'s routing through the compiled kernel: hidden_states (T, H), is_image (T,) bool ->
    logits (T, E) (the router's own, no dropout or noise), weights (T, 1), index (T, 1)."""
    return _kernel()(hidden_states, *fused_route_arguments(router, hidden_states, is_image))


def fused_route_arguments(
    router: torch.nn.Module, hidden_states: torch.Tensor, is_image: torch.Tensor
) -> tuple:
    """What `fused_route` passes the kernel after the hidden states, read from the router and its config now (they
    change between calls: a stage sets `gumbel_tau`, the bench the mode). Apart so that `moe-vlm bench` can time the
    kernel without the Python around it (`benchmarks/cases.py`, `block_direct`)."""
    config = router.config
    mode = config.router_mode  # each config read costs about a microsecond (transformers' __getattribute__)
    training = router.training
    p = config.router_dropout if training and mode != "hard" else 0.0
    if p > 0 and config.router_dropout_on == "input":
        raise ValueError(
            f'router_implementation="{FUSED}" applies router dropout on the logits only, but router_dropout_on='
            f'"input": set router_dropout_on="logits" or router_implementation="{EAGER}"'
        )
    offset, drop = None, None
    if mode == "hard":
        kind = _MODALITY
    elif mode == "softmax":
        if config.num_experts_per_tok != 1:
            raise ValueError(
                f'router_implementation="{FUSED}" routes top-1, but num_experts_per_tok='
                f'{config.num_experts_per_tok}: use router_implementation="{EAGER}"'
            )
        kind = _SOFTMAX
    else:
        kind = _STRAIGHT_THROUGH_GUMBEL if training else _ARGMAX
        if mode == "modality_aware":  # the learned per-modality term, part of the returned logits (T, E)
            offset = router.modality_proj(router.modality_embedding(is_image.long()))
    if p > 0:
        # F.dropout's draw on CPU, on a tensor of the logits' shape and dtype: the eager router's stream
        drop = torch.empty(hidden_states.size(0), router.num_experts, dtype=hidden_states.dtype)
        drop = drop.bernoulli_(1 - p).div_(1 - p)  # (T, E)
    bias = router.expert_bias if config.router_bias_update_rate else None  # (E,), the decision only
    roles = config.modality_to_expert  # read by the modality kind only, tau by the Gumbel sample only
    return (
        router.weight,
        offset,
        drop,
        bias,
        is_image,
        float(config.gumbel_tau),
        kind,
        roles["image"],
        roles["text"],
    )
