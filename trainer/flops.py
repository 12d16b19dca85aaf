"""Model FLOPs of a step, analytic from the config, and the fp32 matmul rate this process achieves: the two numbers
a utilisation figure divides.

Model FLOPs, counted the PaLM way (the work the model needs, not what a kernel happens to execute): 2 per
multiply-add of every matmul with a weight, on the rows that really pass through it:

* attention projections and the router on every token; only the experts a token is dispatched to
  (`num_experts_per_tok` of them), so an MoE step is credited with the dense model it replaces, plus its routers;
* attention scores and the weighted sum, 4 x seq x (heads x head_dim) per token, the full square (SDPA computes it);
* the LM head only on the rows that get logits (the labelled positions in training: the model computes no others);
* the connector on the image tokens, the vision tower's forward per image (counted once per tower configuration
  by `torch.utils.flop_counter`: its convolutions are not a function of a few config numbers).

Backward, per component: its weight gradient costs its forward FLOPs when it trains; its input gradient costs its
forward FLOPs (twice for the attention scores, which have two activation operands) when anything earlier in the
forward trains, since the gradient must flow through it. So Stage 1 (connector + attention) pays the input
gradients of the frozen experts and head, and Stage 2 (experts) pays nothing below layer 0.

Why hand-written: `torch.utils.flop_counter.FlopCounterMode` counts what runs, so it charges padding and sees
nothing of kernels it has no formula for (CPU SDPA, `_grouped_mm`); `PreTrainedModel.floating_point_ops` is 6 x all
parameters x tokens (both experts, the whole head). tests/test_flops.py checks this count against FlopCounterMode
on the eager paths, where the two must agree.
"""

from __future__ import annotations

import re
import time

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _trains(model: nn.Module, prefix: str) -> bool:
    return any(p.requires_grad for n, p in model.named_parameters() if n.startswith(prefix))


def _trainable_parts(model: nn.Module) -> dict:
    """Which components train, from `requires_grad`: {"vision", "connector", "embed", "head"} -> bool and per layer
    {"attn": bool, "mlp": bool, "router": bool} (the MLP or the experts; the router)."""
    layers: dict[int, dict[str, bool]] = {}
    for name, param in model.named_parameters():
        match = _LAYER.match(name)
        if match:
            part = "attn" if match.group(2) == "self_attn" else "router" if ".mlp.gate." in name else "mlp"
            entry = layers.setdefault(int(match.group(1)), {"attn": False, "mlp": False, "router": False})
            entry[part] = entry[part] or param.requires_grad
    return {
        "vision": _trains(model, "model.vision_tower."),
        "connector": _trains(model, "model.connector."),
        "embed": _trains(model, "model.embed_tokens."),
        "head": _trains(model, "lm_head."),
        "layers": layers,
    }


_TOWER_FLOPS: dict[tuple, float] = {}


def _tower_forward_flops(config) -> float:
    """Forward FLOPs of one image through the model's vision tower up to the layer the connector reads (the tower's
    own forward, which stops there), counted by `torch.utils.flop_counter` on the meta device: no memory, no
    arithmetic, once per tower configuration."""
    from torch.utils.flop_counter import FlopCounterMode

    from modeling_moe_vlm.modeling_moe_vlm import MoeVlmVisionTower

    key = (config.vision_config.to_json_string(), config.vision_feature_layer)
    if key not in _TOWER_FLOPS:
        size = config.vision_config.image_size
        with torch.device("meta"):
            tower = MoeVlmVisionTower(config)
            with FlopCounterMode(display=False) as counter:
                tower(torch.empty(1, 3, size, size))
        _TOWER_FLOPS[key] = float(counter.get_total_flops())
    return _TOWER_FLOPS[key]


def _components(model: nn.Module, input_ids: torch.Tensor, head_rows: int, n_images: int) -> list[tuple]:
    """(forward FLOPs, trains, n_operands) per component, in forward order. n_operands: 1 for a weight matmul
    (input gradient = forward once), 2 for the attention scores (both operands are activations), 0 where no gradient
    passes (the router under hard routing)."""
    config = model.config
    batch, seq = input_ids.shape
    tokens = batch * seq
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = _head_dim(config)
    parts = _trainable_parts(model)
    out = []
    if getattr(config, "vision_config", None) is not None and n_images:
        out.append((_tower_forward_flops(config) * n_images, parts["vision"], 1))
        connector = sum(m.weight.numel() for m in model.model.connector.modules() if isinstance(m, nn.Linear))
        out.append((2.0 * connector * n_images * config.num_image_tokens, parts["connector"], 1))
    out.append((0.0, parts["embed"], 1))  # a lookup: no FLOPs, but a trainable embedding needs every gradient
    moe_layers = set(getattr(config, "moe_layers", None) or [])
    for i in range(config.num_hidden_layers):
        layer = parts["layers"].get(i, {"attn": False, "mlp": False, "router": False})
        # Each matmul its own component: a weight gradient inside a block needs the input gradients of the matmuls
        # after it (q/k/v's need o's and the scores'; gate/up's need down's) even when nothing below the block trains.
        out.append((2.0 * hidden * (heads + 2 * kv_heads) * head_dim * tokens, layer["attn"], 1))  # q, k, v
        out.append((4.0 * seq * heads * head_dim * tokens, False, 2))  # scores, weighted sum
        out.append((2.0 * heads * head_dim * hidden * tokens, layer["attn"], 1))  # o
        routed = tokens
        if i in moe_layers:
            routed = tokens * config.num_experts_per_tok  # the routed experts only
            # The router's decision carries a gradient except under hard routing, where its output is unused.
            carries = getattr(config, "router_mode", "hard") != "hard"
            out.append(
                (2.0 * hidden * config.num_experts * tokens, layer["router"] and carries, int(carries))
            )
        out.append((2.0 * hidden * 2 * inter * routed, layer["mlp"], 1))  # gate, up
        out.append((2.0 * inter * hidden * routed, layer["mlp"], 1))  # down
    out.append((2.0 * hidden * config.vocab_size * head_rows, parts["head"], 1))
    return out


def head_rows(model: nn.Module, batch: dict) -> int:
    """Rows of the LM head in a training forward: MoeVlm computes logits at labelled positions only
    (`MoeVlmForCausalLM.forward`), any other causal LM (the pretraining Mistral) at every position."""
    labels = batch.get("labels")
    if labels is not None and hasattr(model.config, "moe_layers") and model.training:
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        return int((shifted != IGNORE_INDEX).sum())
    return int(batch["input_ids"].numel())


def step_flops(model: nn.Module, batch: dict, *, backward: bool = True, rows: int | None = None) -> float:
    """Model FLOPs of one forward (+ backward, by the trainable set the model has now) of `model` on `batch`
    (`input_ids`, optional `labels` and `pixel_values`). `rows`: rows of the LM head, when not a training forward
    (e.g. 1 per sequence with `logits_to_keep=1`)."""
    ids = batch["input_ids"]
    images = batch.get("pixel_values")
    n_images = 0 if images is None else int(images.shape[0])
    components = _components(model, ids, head_rows(model, batch) if rows is None else rows, n_images)
    total = sum(c[0] for c in components)
    if backward:
        earlier_trains = False
        for forward, trains, operands in components:
            if trains:
                total += forward  # weight gradient
            if earlier_trains:
                total += forward * operands  # input gradient(s)
            earlier_trains = earlier_trains or trains
    return float(total)


def generation_flops(model: nn.Module, prompt: dict, new_tokens: int) -> float:
    """Model FLOPs of greedy generation with the KV cache: the prefill (logits for the last position only), then one
    token per sequence per step attending to everything before it."""
    ids = prompt["input_ids"]
    batch, prompt_len = ids.shape
    total = step_flops(model.eval(), prompt, backward=False, rows=batch)
    config = model.config
    per_token = step_flops(model, {"input_ids": ids[:, :1]}, backward=False, rows=batch)
    scores_1 = (
        4.0 * config.num_attention_heads * _head_dim(config) * batch * config.num_hidden_layers
    )  # per context position
    for step in range(1, new_tokens):
        # a 1-token forward counted attention over 1 position; the cache holds prompt_len + step of them
        total += per_token + scores_1 * (prompt_len + step - 1)
    return float(total)


MATMUL_BACKENDS = ("torch", "onednn")


def matmul_rate(
    size: int = 1024, seconds: float = 0.5, shape: tuple[int, int, int] | None = None, backend: str = "torch"
) -> float | None:
    """fp32 FLOP/s of a square `size` matmul (or an (m, k) @ (k, n) one, `shape=(m, k, n)`) on this process's torch
    threads (`torch.get_num_threads()`): the rate this CPU reaches on work that is nothing but such matmuls. Best of
    repeated timed groups (a shared machine's noise only ever slows a sample down).

    `backend` is one of `MATMUL_BACKENDS`. `"torch"` times `torch.mm`, what every fp32 linear of the model runs
    (MKL's sgemm in the standard CPU wheel). `"onednn"` times the same product through oneDNN
    (`torch.ops.mkldnn._linear_pointwise`, the op inductor's CPU backend emits for a linear, on dense tensors): a
    second reference for how far torch's fp32 rate is from what the CPU can do, since MKL's sgemm reaches half of
    oneDNN's rate on some CPUs (README, Utilisation); None where this torch has no oneDNN or its op fails."""
    m, k, n = shape or (size, size, size)
    a = torch.randn(m, k)
    if backend == "torch":
        b, out = torch.randn(k, n), torch.empty(m, n)

        def call():
            torch.mm(a, b, out=out)

    elif backend == "onednn":
        linear = _onednn_linear()
        if linear is None:
            return None
        w = torch.randn(n, k)  # (out, in), a linear's weight: a @ w.T is the (m, n) product

        def call():
            linear(a, w, None, "none", [], "")

        try:  # the op may be there yet refuse this build's tensors: then no reference rate rather than a crash
            call()
        except RuntimeError:
            return None
    else:
        raise ValueError(f"matmul_rate: backend={backend!r} is not one of {MATMUL_BACKENDS}")
    call()  # warm
    start = time.perf_counter()
    call()
    once = max(time.perf_counter() - start, 1e-6)
    number = max(1, int(0.05 / once))
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        start = time.perf_counter()
        for _ in range(number):
            call()
        best = min(best, (time.perf_counter() - start) / number)
    return 2.0 * m * k * n / best


def _onednn_linear():
    """oneDNN's dense linear op, or None where this torch build has no oneDNN (or no longer ships the op)."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


__all__ = ["MATMUL_BACKENDS", "generation_flops", "head_rows", "matmul_rate", "step_flops"]
