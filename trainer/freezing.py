"""What each stage trains, as named parameter groups.

Every parameter of `MoeVlmForCausalLM` belongs to exactly one group (`group_of` raises for a name it does not
know), so a stage's trainable set is a list of group names (a recipe field) and "exactly what its stage trains"
can be checked by name. The paper's stages:

    Stage 1    connector (tiny: + attention)  Stage 2     experts (hard routing)
    Stage 2.5  router (experts frozen)        Stage 3     router + attention + experts
    dense      mlp (the dense control of Stage 2)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

logger = logging.getLogger("moe_vlm.trainer")

# Parameter name patterns of MoeVlmForCausalLM (a Mistral subclass: `model.layers.N.…`, `lm_head`).
PARAMETER_GROUPS: dict[str, re.Pattern] = {
    name: re.compile(pattern)
    for name, pattern in {
        "embeddings": r"model\.embed_tokens\.",
        "attention": r"model\.layers\.\d+\.self_attn\.",
        "norms": r"model\.(layers\.\d+\.(input|post_attention)_layernorm|norm)\.",
        "router": r"model\.layers\.\d+\.mlp\.gate\.",
        "experts": r"model\.layers\.\d+\.mlp\.experts\.",
        "mlp": r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.",
        "connector": r"model\.connector\.",
        "vision_tower": r"model\.vision_tower\.",
        "lm_head": r"lm_head\.",
    }.items()
}

# A router parameter trains only where it gets a gradient: the modality embedding and projection enter the logits
# only in `modality_aware` mode; under `hard` routing the router is bypassed and learns only from a router loss.
_MODALITY_ROUTER = re.compile(r"\.mlp\.gate\.modality_(embedding|proj)\.")


def _router_learns(name: str, config) -> bool:
    mode = getattr(config, "router_mode", None)
    if _MODALITY_ROUTER.search(name):
        return mode == "modality_aware"
    return mode != "hard" or config.router_losses_weighted  # only MoeVlmConfig has router parameters


def group_of(name: str) -> str:
    """The group a parameter name belongs to; a ValueError for a name no group matches."""
    for group, pattern in PARAMETER_GROUPS.items():
        if pattern.match(name):
            return group
    raise ValueError(f"parameter {name!r} belongs to no parameter group ({', '.join(PARAMETER_GROUPS)})")


def check_groups(groups: Iterable[str]) -> list[str]:
    groups = list(groups)
    unknown = [g for g in groups if g not in PARAMETER_GROUPS]
    if unknown:
        raise ValueError(f"unknown parameter group(s) {unknown}; choose from {', '.join(PARAMETER_GROUPS)}")
    if not groups:
        raise ValueError("the trainable set is empty: name at least one parameter group")
    return groups


def trainable_names(model: nn.Module, groups: Iterable[str]) -> list[str]:
    """Names of the parameters that `groups` train on `model`, given its router mode and router-loss coefficients
    (a router parameter that cannot get a gradient is left frozen, so "trainable" means "expected to change")."""
    groups = set(check_groups(groups))
    names = []
    for name, _ in model.named_parameters():
        group = group_of(name)
        if group in groups and (group != "router" or _router_learns(name, model.config)):
            names.append(name)
    return names


def apply_trainable(model: nn.Module, groups: Iterable[str]) -> list[str]:
    """Freeze everything, then unfreeze `groups`. Returns the trainable parameter names.

    Raises when a named group has no parameter in this model (e.g. `experts` on the dense control), so a recipe
    cannot silently train nothing; warns when a group's parameters cannot learn in this routing set-up (a bypassed
    router without a router loss) and stay frozen.
    """
    groups = check_groups(groups)
    present = {group_of(name) for name, _ in model.named_parameters()}
    missing = [g for g in groups if g not in present]
    if missing:
        raise ValueError(
            f"this model has no parameters in group(s) {missing} (moe_layers={getattr(model.config, 'moe_layers', None)})"
        )
    names = set(trainable_names(model, groups))
    idle = [g for g in groups if g not in {group_of(n) for n in names}]
    if idle:
        logger.warning(
            "parameter group(s) %s get no gradient with router_mode=%r and no router loss: they stay frozen",
            idle,
            getattr(model.config, "router_mode", None),
        )
    # The model runs a frozen tower under no_grad: training it must switch that off.
    if "vision_tower" in groups:
        model.config.freeze_vision_tower = False
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    return sorted(names)


def fingerprints(model: nn.Module) -> dict[str, tuple[float, float]]:
    """A cheap per-parameter fingerprint (sum, L2 norm): identical for an untouched tensor, different (in practice)
    after any optimiser update. Used to check after training that exactly the trainable parameters changed without
    keeping a copy of a 7B model. Under FSDP2 a parameter is a sharded DTensor: its full value is gathered (a collective:
    every process calls this at the same point), one parameter at a time."""
    out = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            values = param.detach()
            values = (values.full_tensor() if isinstance(values, DTensor) else values).float()
            out[name] = (float(values.sum()), float(torch.linalg.vector_norm(values)))
    return out


def changed_params_check(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], trainable: Iterable[str]
) -> dict:
    """Compare fingerprints: `ok` when every trainable parameter changed and no other one did."""
    trainable = set(trainable)
    changed = {name for name in before if before[name] != after.get(name)}
    frozen_changed = sorted(changed - trainable)
    trainable_unchanged = sorted(trainable - changed)
    return {
        "ok": not frozen_changed and not trainable_unchanged,
        "n_trainable": len(trainable),
        "n_changed": len(changed),
        "frozen_changed": frozen_changed,
        "trainable_unchanged": trainable_unchanged,
    }


__all__ = [
    "PARAMETER_GROUPS",
    "apply_trainable",
    "changed_params_check",
    "check_groups",
    "fingerprints",
    "group_of",
    "trainable_names",
]
