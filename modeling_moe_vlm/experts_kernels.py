"""`sorted_top1`: an experts kernel for top-1 routing over a few small SwiGLU experts, registered in transformers'
`ExpertsInterface` so that `experts_implementation="sorted_top1"` selects it (`from_pretrained`, `set_experts_
implementation`, or `config._experts_implementation`) beside transformers' `eager`, `grouped_mm` and `batched_mm`.

Why write one: at the embedded default's size (hidden 128, intermediate 256, two experts, ~500 tokens a batch) a
dense MLP's forward + backward takes a few milliseconds, so what an MoE block costs beyond it is the number of small
operations and autograd nodes the dispatch adds, not arithmetic. `grouped_mm` sorts, gathers, counts with `histc`,
multiplies, un-permutes by scatter and reduces over top-k: about twenty autograd nodes, and on CPU its grouped
matmul zero-fills and concatenates. For top-1 most of that is not needed. This kernel runs the whole experts
computation as one `torch.autograd.Function` whose backward is written out (SwiGLU's derivative included): one stable
sort, one gather, two matmuls per expert (written in place into one buffer), one scatter, and the same in reverse.
It gives the outputs and gradients of the eager path (tests/test_experts_kernel.py) and is compared with eager and
grouped_mm by `moe-vlm bench`.

Scope (checked, with a clear error otherwise): top-1 routing, SiLU-gated experts in Mixtral's concatenated layout
(`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I), no bias), which is what `MoeVlmExperts` is. It syncs once with
the host per call (the per-expert token counts), so it is meant for CPU and small models; on a GPU prefer
`grouped_mm`. No double backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.moe import ExpertsInterface

KERNEL_NAME = "sorted_top1"


def _check_supported(module, top_k_index: torch.Tensor) -> None:
    if top_k_index.dim() == 2 and top_k_index.size(-1) != 1:
        raise ValueError(
            f'experts_implementation="{KERNEL_NAME}" serves top-1 routing only, but the router chose '
            f"{top_k_index.size(-1)} experts per token: set num_experts_per_tok=1 or use grouped_mm"
        )
    act = getattr(module.config, "hidden_act", "silu")
    if act != "silu" or getattr(module, "has_bias", False) or not getattr(module, "has_gate", True):
        raise ValueError(
            f'experts_implementation="{KERNEL_NAME}" serves bias-free SiLU-gated experts (Mixtral layout); this module '
            f"has hidden_act={act!r}, has_bias={getattr(module, 'has_bias', False)}: use grouped_mm"
        )
    if not getattr(module, "is_concatenated", True) or getattr(module, "is_transposed", False):
        raise ValueError(
            f'experts_implementation="{KERNEL_NAME}" needs gate_up_proj stored as concatenated (E, 2I, H): use grouped_mm'
        )


def _segments(counts: list[int]):
    """(expert, start, end) of each expert's non-empty run of rows in expert-sorted order."""
    start = 0
    for expert, n in enumerate(counts):
        if n:
            yield expert, start, start + n
        start += n


def _weight_grad(weight: torch.Tensor, segments: list) -> torch.Tensor:
    """A buffer for the stacked weight's gradient: every expert with tokens writes its slice; only experts that got
    none are zero-filled."""
    grad = torch.empty_like(weight)
    for e in sorted(set(range(weight.size(0))) - {seg[0] for seg in segments}):
        grad[e].zero_()
    return grad


class _SortedTop1Experts(torch.autograd.Function):
    """out[t] = w[t] * down[e_t] @ (silu(g) * u), (g, u) = split(gate_up[e_t] @ x[t]), for each token t."""

    @staticmethod
    def forward(ctx, hidden, expert_ids, weights, gate_up, down):
        tokens = hidden.size(0)
        inter = down.size(-1)
        counts = torch.bincount(expert_ids, minlength=gate_up.size(0)).tolist()  # the one host sync
        perm = torch.argsort(expert_ids, stable=True)  # (T,) rows in expert order
        x = hidden.index_select(0, perm)  # (T, H)
        gu = x.new_empty(tokens, 2 * inter)  # (T, 2I)
        segments = list(_segments(counts))
        for e, s, t in segments:
            torch.mm(x[s:t], gate_up[e].t(), out=gu[s:t])
        g, u = gu[:, :inter], gu[:, inter:]
        act = F.silu(g)  # (T, I), kept for the backward
        h = act * u  # (T, I)
        y = x.new_empty(tokens, down.size(1))  # (T, H)
        for e, s, t in segments:
            torch.mm(h[s:t], down[e].t(), out=y[s:t])
        w = weights.index_select(0, perm)  # (T,)
        out = torch.empty_like(y).index_copy_(0, perm, y * w.unsqueeze(-1))  # (T, H), token order
        ctx.save_for_backward(perm, x, gu, act, h, y, w, gate_up, down)
        ctx.segments = segments
        return out

    @staticmethod
    def backward(ctx, grad_out):
        perm, x, gu, act, h, y, w, gate_up, down = ctx.saved_tensors
        segments = ctx.segments
        need_x, _, need_w, need_gate_up, need_down = ctx.needs_input_grad
        inter = down.size(-1)
        go = grad_out.index_select(0, perm)  # (T, H), expert order
        grad_w = None
        if need_w:
            grad_w = torch.empty_like(w).index_copy_(0, perm, torch.linalg.vecdot(go, y))  # (T,)
        gy = go * w.unsqueeze(-1)  # (T, H): gradient of y
        gh = torch.empty_like(h)  # (T, I)
        grad_down = _weight_grad(down, segments) if need_down else None
        for e, s, t in segments:
            torch.mm(gy[s:t], down[e], out=gh[s:t])
            if need_down:
                torch.mm(gy[s:t].t(), h[s:t], out=grad_down[e])
        # h = silu(g) * u: d/dg through aten's fused silu_backward (what autograd runs for F.silu), d/du = silu(g)
        g, u = gu[:, :inter], gu[:, inter:]
        dgu = torch.empty_like(gu)  # (T, 2I)
        dgu[:, :inter] = torch.ops.aten.silu_backward(gh * u, g)
        torch.mul(gh, act, out=dgu[:, inter:])
        grad_gate_up = _weight_grad(gate_up, segments) if need_gate_up else None
        grad_x = None
        gx = torch.empty_like(x) if need_x else None  # (T, H)
        for e, s, t in segments:
            if need_x:
                torch.mm(dgu[s:t], gate_up[e], out=gx[s:t])
            if need_gate_up:
                torch.mm(dgu[s:t].t(), x[s:t], out=grad_gate_up[e])
        if need_x:
            grad_x = torch.empty_like(gx).index_copy_(0, perm, gx)
        return grad_x, None, grad_w, grad_gate_up, grad_down


def sorted_top1_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The `ExpertsInterface` signature: hidden_states (T, H), top_k_index / top_k_weights (T, 1) -> (T, H)."""
    _check_supported(self, top_k_index)
    weights = top_k_weights.reshape(-1).to(hidden_states.dtype)  # (T,)
    # (T, H), in hidden_states' dtype: every buffer is allocated from it
    return _SortedTop1Experts.apply(
        hidden_states, top_k_index.reshape(-1), weights, self.gate_up_proj, self.down_proj
    )


ExpertsInterface.register(KERNEL_NAME, sorted_top1_experts_forward)
