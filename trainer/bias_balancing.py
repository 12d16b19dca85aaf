"""Auxiliary-loss-free load balancing (DeepSeek-V3, Wang et al. 2024 "Auxiliary-Loss-Free Load Balancing Strategy
for Mixture-of-Experts"): each router adds a per-expert bias to the logits its decision is taken from
(`MoeVlmRouter.expert_bias`, a buffer: the loss never trains it), and after every optimizer step the bias moves by a
fixed rate against the load the step observed: up for an expert that got fewer tokens than the mean, down for one
that got more (b_e += rate * sign(mean load - load_e)).

Written here because no library we use ships it for a custom router: transformers' DeepSeek-V3 keeps its
`e_score_correction_bias` as a loaded buffer and leaves the update to the training code, and TRL and accelerate have
none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import TrainerCallback


class ExpertBiasBalancer:
    """Per-layer dispatch counts of the current optimizer step (every micro-batch of it, padding excluded), and the
    update that spends them."""

    def __init__(self, layers: Sequence[int], num_experts: int, rate: float):
        self.layers, self.num_experts, self.rate = list(layers), num_experts, float(rate)
        self.counts = torch.zeros(len(self.layers), num_experts, dtype=torch.float64)  # (layers, E)

    @torch.no_grad()
    def observe(self, router_indices: Sequence[torch.Tensor], attention_mask: torch.Tensor | None) -> None:
        """Add one micro-batch: `router_indices[i]` (batch*seq, k) of MoE layer `layers[i]`; `attention_mask`
        (batch, seq), 0 at padding."""
        valid = None  # (batch*seq,) the same tokens in every layer
        if attention_mask is not None and router_indices:
            seq = router_indices[0].shape[0] // attention_mask.shape[0]
            valid = attention_mask[:, -seq:].reshape(-1).bool().to(router_indices[0].device)
        for row, index in enumerate(router_indices):
            index = index if valid is None else index[valid]
            counts = torch.bincount(index.reshape(-1), minlength=self.num_experts)
            self.counts[row] += counts.to(self.counts)

    @torch.no_grad()
    def step(self, model, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        """Move every router's bias against the step's load (`reduce` sums the counts across processes, so every
        process moves its copy alike), then start counting the next step."""
        counts = reduce(self.counts.clone())
        self.counts.zero_()
        blocks = model.moe_blocks()
        for row, layer in enumerate(self.layers):
            load = counts[row]
            if load.sum() == 0:
                continue
            bias = blocks[layer].gate.expert_bias
            bias += (self.rate * torch.sign(load.mean() - load)).to(bias)


class ExpertBiasCallback(TrainerCallback):
    """Runs the balancer's update after each optimizer step (`on_step_end` follows the step and the scheduler)."""

    def __init__(self, balancer: ExpertBiasBalancer, reduce: Callable[[torch.Tensor], torch.Tensor]):
        self.balancer, self.reduce = balancer, reduce

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.balancer.step(_unwrapped(model), self.reduce)


def _unwrapped(model):
    """The model under DDP / FSDP wrappers (`moe_blocks` is the MoeVlm model's)."""
    while not hasattr(model, "moe_blocks") and hasattr(model, "module"):
        model = model.module
    return model
