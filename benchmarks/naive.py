"""The naive MoE block: every expert runs on every token, and a mask keeps the chosen expert's output.

It exists only here, as the comparison that shows what sparse dispatch saves: with two experts it does twice
the expert arithmetic of the real block, so it should cost about 2x the dense MLP. If it does not, the
benchmark is measuring overhead rather than arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn


class NaiveBothExpertsBlock(nn.Module):
    """Same router and expert weights as `block` (a `MoeVlmSparseMoeBlock`, shared, not copied), same output;
    dense compute: E full expert passes over all tokens, then a one-hot mask scaled by the routing weight."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.gate = block.gate
        self.experts = block.experts

    def forward(self, hidden_states: torch.Tensor, modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)  # (tokens, hidden)
        if modality_mask is None:
            is_image = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
        else:
            is_image = modality_mask.reshape(-1)
        _, weights, index = self.gate(flat, is_image)  # (tokens, k), (tokens, k)
        experts = self.experts
        # (tokens, E): the routing weight where the expert was chosen, 0 elsewhere.
        mask = torch.zeros(flat.shape[0], experts.num_experts, dtype=flat.dtype, device=flat.device)
        mask = mask.scatter_add(1, index, weights.to(flat.dtype))
        out = torch.zeros_like(flat)
        for e in range(experts.num_experts):  # a loop over experts (2), never over tokens
            gate, up = nn.functional.linear(flat, experts.gate_up_proj[e]).chunk(2, dim=-1)  # (tokens, I) x2
            expert_out = nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])  # (tokens, H)
            out = out + expert_out * mask[:, e : e + 1]
        return out.reshape(batch, seq, hidden)
