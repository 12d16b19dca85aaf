"""The dense control: the same VLM with a plain Mistral MLP in every layer (`moe_layers=[]`).

It starts from the Stage 1 output, where every expert is still an identical copy of the upcycled dense MLP, so
taking one expert's weights gives back the dense model exactly; it then trains its MLPs on Stage 2's data and
budget (`DenseControlTrainer`).
"""

from __future__ import annotations

import torch

from modeling_moe_vlm import MoeVlmConfig, MoeVlmForCausalLM


def to_dense(model: MoeVlmForCausalLM, expert: int = 0) -> MoeVlmForCausalLM:
    """A copy of `model` whose MoE layers are dense MLPs holding expert `expert`'s weights; everything else
    (attention, norms, embeddings, head, vision tower, connector) is copied unchanged and the routers are dropped.
    A model that is already dense is returned as is."""
    moe_layers = list(model.config.moe_layers)
    if not moe_layers:
        return model
    if not 0 <= expert < model.config.num_experts:
        raise ValueError(f"expert {expert} does not exist: the model has {model.config.num_experts} experts")
    config = MoeVlmConfig.from_dict({**model.config.to_dict(), "moe_layers": []})
    dtype = next(model.parameters()).dtype
    dense = type(model)(config).to(dtype)
    source = model.state_dict()
    target = dense.state_dict()
    intermediate = model.config.intermediate_size
    with torch.no_grad():
        for key, value in target.items():
            if key in source:
                value.copy_(source[key])
        for i in moe_layers:
            experts = model.model.layers[i].mlp.experts
            mlp = dense.model.layers[i].mlp
            # (2I, H): the gate rows, then the up rows, as upcycling stacked them.
            gate_up = experts.gate_up_proj[expert]
            mlp.gate_proj.weight.copy_(gate_up[:intermediate])
            mlp.up_proj.weight.copy_(gate_up[intermediate:])
            mlp.down_proj.weight.copy_(experts.down_proj[expert])  # (H, I)
    dense.model.freeze_vision_tower()
    return dense


__all__ = ["to_dense"]
