"""Divergence: a non-finite loss, gradient or weight stops a stage, naming the step and where it went non-finite.

The stage Trainer checks two numbers it has anyway, each step: the loss `training_step` returns and the gradient
norm the Trainer computes for clipping and logging (`MoeVlmStageTrainer.training_step` / `_get_grad_norm`), and
the weights once before each checkpoint is written (so a checkpoint is never non-finite). Only when one is not
finite does `diagnose` look further, in this order, and say what it found in model terms (`layer 1 router`,
`layer 0 expert 1`, `lm_head`):

1. non-finite weights (the cause when an update or an outside write broke a parameter), per parameter and, for the
   stacked experts (`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)), per expert;
2. for a non-finite loss with finite weights, the batch is run forward again with hooks on the embeddings, the vision
   tower, the connector and each layer's attention, norms, router and experts: the first module in execution order
   whose output is not finite is where the activations overflowed (every gradient is non-finite then: no help);
3. for a non-finite gradient norm of a finite loss, the parameters whose gradients are non-finite, computed again on
   the step's batches (clipping by a non-finite norm has made every gradient non-finite by then).

The error is raised before the optimizer step (the weights of the failed step are never applied) or, for the
check before a checkpoint, before anything of that checkpoint is written; so no later checkpoint is written, the
stage writes no completion marker, and the last good checkpoint stays where it was.
`TrainingDivergedError` is a `ValueError` so that `moe-vlm train` reports it as one line and exits non-zero
(`moe_vlm_cli.main`), as it reports a bad recipe.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from .freezing import group_of

# Prefixes wrappers insert into parameter and module names (DDP, FSDP, activation checkpointing, torch.compile).
_WRAPPER = re.compile(r"(^|\.)(module|_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_LINEAR_EXPERT = re.compile(r"\.experts\.(\d+)\.")
# The modules whose outputs the forward pass is checked at (2. above), matched on the plain model's module names.
_CHECKED_MODULE = re.compile(
    r"model\.(embed_tokens|vision_tower|connector|norm"
    r"|layers\.\d+\.(self_attn|input_layernorm|post_attention_layernorm|mlp\.gate|mlp\.experts|mlp))|lm_head"
)


class TrainingDivergedError(ValueError):
    """A stage stopped on a non-finite loss, gradient or weight; the message names the step and the layer."""


def plain_name(name: str) -> str:
    """A parameter or module name without the prefixes wrappers add (`module.`, `_fsdp_wrapped_module.`, ...)."""
    return _WRAPPER.sub(r"\1", name)


def part_of(name: str) -> str:
    """What a parameter or module is, in model terms: `layer 1 router`, `layer 0 experts`, `layer 1 attention`,
    `connector`, `lm_head` (the parameter group of `trainer.freezing`, with its layer)."""
    name = plain_name(name)
    layer = _LAYER.match(name)
    try:
        group = group_of(name if name.endswith(".") else name + ".")
    except ValueError:  # a module holding several groups (a layer's `mlp` block) or an unknown name
        return f"layer {layer.group(1)} {name[layer.end() :]}" if layer else name
    return f"layer {layer.group(1)} {group}" if layer else group


def _non_finite_parts(name: str, tensor: torch.Tensor, num_experts: int | None) -> list[str]:
    """The parts of one parameter's tensor that hold a non-finite value: per expert for stacked experts."""
    part = part_of(name)
    expert = _LINEAR_EXPERT.search(name)
    if part.endswith(" experts") and expert:  # one nn.Linear per expert
        return [f"{part.removesuffix('s')} {expert.group(1)}"]
    if part.endswith(" experts") and num_experts and tensor.dim() > 1 and tensor.shape[0] == num_experts:
        return [
            f"{part.removesuffix('s')} {e}" for e in range(num_experts) if not torch.isfinite(tensor[e]).all()
        ]
    return [part]


def non_finite(
    named: Iterable[tuple[str, torch.Tensor | None]], num_experts: int | None = None
) -> list[tuple[str, str, int, int]]:
    """(part, parameter name, non-finite count, size) of each tensor holding a NaN or an infinity, in model order.
    One fused norm over all tensors finds the candidates (a non-finite value makes its tensor's norm non-finite);
    each candidate is then checked exactly (a huge finite tensor's norm can overflow too)."""
    named = [(n, t.detach()) for n, t in named if t is not None and t.is_floating_point() and t.numel()]
    if not named:
        return []
    norms = torch.stack([n.float() for n in torch._foreach_norm([t for _, t in named])])
    candidates = torch.nonzero(~torch.isfinite(norms)).flatten().tolist()
    found = []
    for i in candidates:
        name, tensor = named[i]
        count = int((~torch.isfinite(tensor)).sum())
        if count:
            for part in _non_finite_parts(name, tensor, num_experts):
                found.append((part, plain_name(name), count, tensor.numel()))
    return found


def first_non_finite_output(model: nn.Module, forward: Callable[[], object]) -> str | None:
    """Run `forward()` (the failed batch through `model`) without gradients, with a hook on each checked module;
    returns the part whose output was the first non-finite one in execution order, or None."""
    first: list[str] = []

    def check(name):
        def hook(module, args, output):
            if first:
                return
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            tensors = [o for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]
            if any(not torch.isfinite(t).all() for t in tensors):
                first.append(part_of(name))

        return hook

    handles = [
        module.register_forward_hook(check(name))
        for name, module in model.named_modules()
        if _CHECKED_MODULE.fullmatch(plain_name(name))
    ]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return first[0] if first else None


def _listing(found: list[tuple[str, str, int, int]]) -> str:
    parts = {}
    for part, name, count, size in found:
        parts.setdefault(part, []).append(f"{name}: {count} of {size} values")
    return "; ".join(f"{part} ({', '.join(names)})" for part, names in parts.items())


def diagnose(
    model: nn.Module,
    *,
    stage: str,
    step: int,
    cause: str,
    output_dir: str | Path,
    gradients: Callable[[], bool] | None = None,
    forward: Callable[[], object] | None = None,
    applied: bool = False,
) -> TrainingDivergedError:
    """The error for a stage that went non-finite at `step` (`cause`: what was seen, e.g. `the loss is nan`):
    where, in model terms (module docstring), and which checkpoint is kept. When the weights are finite: `forward`
    reruns the batch to find the first non-finite activation (a non-finite loss), else `gradients` computes the
    step's gradients again, unclipped (returning False where it cannot), and the non-finite ones are named (a
    non-finite gradient norm of a finite loss). `applied`: the step's update was applied (found before its
    checkpoint was written), else it was stopped before it."""
    num_experts = getattr(getattr(model, "config", None), "num_experts", None)
    weights = non_finite(model.named_parameters(), num_experts)
    if weights:
        where = f"non-finite weights in {_listing(weights)}"
    elif forward is not None:
        # A non-finite loss makes every gradient non-finite: the first non-finite activation says where it began.
        part = first_non_finite_output(model, forward)
        where = (
            f"the weights are finite; the first non-finite activation is the output of {part}"
            if part
            else "the weights are finite and no checked module's output is non-finite (the loss itself overflowed)"
        )
    elif gradients is not None and gradients():
        grads = non_finite(((n, p.grad) for n, p in model.named_parameters()), num_experts)
        where = (
            f"the weights are finite; non-finite gradients in {_listing(grads)}"
            if grads
            else "the weights are finite, and so are the gradients computed again on the step's batches (the "
            "non-finite value did not recur: random routing noise?)"
        )
    else:
        where = "the weights are finite (the gradients were not computed again: several processes)"
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = Path(output_dir)
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    kept = (
        f"the last good checkpoint is kept: {last} (resume from it with --resume_from_checkpoint true once the cause is "
        "fixed, e.g. a lower learning_rate or a max_grad_norm)"
        if last
        else "no checkpoint had been saved yet (save_steps)"
    )
    return TrainingDivergedError(
        f"Stage {stage} diverged at step {step}: {cause}; {where}. "
        f"{'Its checkpoint was not written' if applied else 'Stopped before applying the step'}; {kept}; "
        f"{output_dir} has no completion marker"
    )


__all__ = [
    "TrainingDivergedError",
    "diagnose",
    "first_non_finite_output",
    "non_finite",
    "part_of",
    "plain_name",
]
