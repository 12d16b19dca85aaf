"""`sorted_top1`: an experts kernel for top-1 routing over a few small SwiGLU experts, registered in transformers'
`ExpertsInterface` so that `experts_implementation="sorted_top1"` selects it (`from_pretrained`, `set_experts_
implementation`, or `config._experts_implementation`) beside transformers' `eager`, `grouped_mm` and `batched_mm`.

Why write one: at the embedded default's size (hidden 128, intermediate 256, two experts, ~500 tokens a batch) a
dense MLP's forward + backward takes a few milliseconds, so what an MoE block costs beyond it is the number of small
operations and autograd nodes the dispatch adds, not arithmetic. `grouped_mm` sorts, gathers, counts with `histc`,
multiplies, un-permutes by scatter and reduces over top-k: about twenty autograd nodes, and on CPU its grouped
matmul zero-fills and concatenates. For top-1 most of that is not needed. This kernel runs the whole experts
computation as one `torch.autograd.Function` whose backward is written out (SwiGLU's derivative included): one stable
sort, one gather, three matmuls per expert (written in place into contiguous buffers), one gather back, and the same
in reverse.
It gives the outputs and gradients of the eager path (tests/test_experts_kernel.py) and is compared with eager and
grouped_mm by `moe-vlm bench`.

Scope (checked, with a clear error otherwise): top-1 routing, SiLU-gated experts in Mixtral's concatenated layout
(`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I), no bias), which is what `MoeVlmExperts` is. It syncs once with
the host per call (the per-expert token counts), so it is meant for CPU and small models; on a GPU prefer
`grouped_mm`. No double backward.

`sorted_top1_cpp` is the same kernel compiled (a C++ `torch::autograd::Function` in `cpp_kernels.py`, built on first
use with torch's `cpp_extension`; needs g++ and ninja): equal outputs and gradients, and less per-call overhead, which
is what bounds the Python one at the tiny size (README, Benchmarks). On CPU it sorts by counting, fuses each
gather with the multiply by the gate weight and SwiGLU's elementwise part into one pass each way (to float rounding:
it multiplies by sigmoid(g) where aten's silu divides).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.moe import ExpertsInterface

from .cpp_kernels import compiled_for

KERNEL_NAME = "sorted_top1"


def _check_supported(module, top_k_index: torch.Tensor, name: str) -> None:
    if top_k_index.dim() == 2 and top_k_index.size(-1) != 1:
        raise ValueError(
            f'experts_implementation="{name}" serves top-1 routing only, but the router chose '
            f"{top_k_index.size(-1)} experts per token: set num_experts_per_tok=1 or use grouped_mm"
        )
    act = getattr(module.config, "hidden_act", "silu")
    if act != "silu" or getattr(module, "has_bias", False) or not getattr(module, "has_gate", True):
        raise ValueError(
            f'experts_implementation="{name}" serves bias-free SiLU-gated experts (Mixtral layout); this module '
            f"has hidden_act={act!r}, has_bias={getattr(module, 'has_bias', False)}: use grouped_mm"
        )
    if not getattr(module, "is_concatenated", True) or getattr(module, "is_transposed", False):
        raise ValueError(
            f'experts_implementation="{name}" needs gate_up_proj stored as concatenated (E, 2I, H): use grouped_mm'
        )


def _weight_grad(weight: torch.Tensor, live: list[int]) -> torch.Tensor:
    """A buffer for the stacked weight's gradient: every expert with tokens writes its slice; only experts that got
    none are zero-filled."""
    grad = torch.empty_like(weight)
    for e in sorted(set(range(weight.size(0))) - set(live)):
        grad[e].zero_()
    return grad


def grouped_swiglu_forward(x: torch.Tensor, counts: list[int], gate_up: torch.Tensor, down: torch.Tensor):
    """The experts' arithmetic on rows already in expert order: rows `counts[0]` first go through expert 0, and so on.
    x (T, H) -> g, u, act = silu(g), h = act * u (T, I each) and y = down(h) (T, H), the last the output and the rest
    what the backward needs. Separate from the dispatch so that `moe-vlm bench` can time the arithmetic alone: what
    a top-1 kernel built from aten calls pays at the least (the compiled `sorted_top1_cpp` fuses SwiGLU's elementwise
    part, so it can come in under it)."""
    inter, rows = down.size(-1), x.size(0)
    g, u, y = x.new_empty(rows, inter), x.new_empty(rows, inter), x.new_empty(rows, down.size(1))
    live = [e for e, n in enumerate(counts) if n]
    xs, gs, us, ys = x.split(counts), g.split(counts), u.split(counts), y.split(counts)
    for e in live:
        torch.mm(xs[e], gate_up[e, :inter].t(), out=gs[e])
        torch.mm(xs[e], gate_up[e, inter:].t(), out=us[e])
    act = F.silu(g)  # (T, I), kept for the backward
    h = act * u  # (T, I)
    hs = h.split(counts)
    for e in live:
        torch.mm(hs[e], down[e].t(), out=ys[e])
    return g, u, act, h, y


def grouped_swiglu_backward(
    gy, counts, x, g, u, act, h, gate_up, down, need_x=True, need_gate_up=True, need_down=True
):
    """The backward of `grouped_swiglu_forward` from gy (T, H), the gradient of y: the gradients of x (T, H), of
    gate_up (E, 2I, H) and of down (E, H, I), each None where not needed. Consumes gy's buffer."""
    inter = down.size(-1)
    live = [e for e, n in enumerate(counts) if n]
    gh = torch.empty_like(h)  # (T, I)
    gys, ghs, hs = gy.split(counts), gh.split(counts), h.split(counts)
    grad_down = _weight_grad(down, live) if need_down else None
    for e in live:
        torch.mm(gys[e], down[e], out=ghs[e])
        if need_down:
            torch.mm(gys[e].t(), hs[e], out=grad_down[e])
    # h = silu(g) * u: d/dg through aten's fused silu_backward (what autograd runs for F.silu), d/du = silu(g)
    dg = torch.ops.aten.silu_backward(gh * u, g)  # (T, I)
    du = gh.mul_(act)  # (T, I); gh is not needed after this
    grad_gate_up = _weight_grad(gate_up, live) if need_gate_up else None
    gx = torch.empty_like(x) if need_x else None  # (T, H)
    dgs, dus, xs = dg.split(counts), du.split(counts), x.split(counts)
    gxs = gx.split(counts) if need_x else None
    for e in live:
        if need_x:
            torch.mm(dgs[e], gate_up[e, :inter], out=gxs[e])
            gxs[e].addmm_(dus[e], gate_up[e, inter:])
        if need_gate_up:
            torch.mm(dgs[e].t(), xs[e], out=grad_gate_up[e, :inter])
            torch.mm(dus[e].t(), xs[e], out=grad_gate_up[e, inter:])
    return gx, grad_gate_up, grad_down


class _SortedTop1Experts(torch.autograd.Function):
    """out[t] = w[t] * down[e_t] @ (silu(g) * u), g = gate[e_t] @ x[t], u = up[e_t] @ x[t], for each token t.

    Rows are sorted by expert once (`perm`; `inv` puts them back by a gather, cheaper on CPU than a scatter), each
    expert's rows are one contiguous block (`split`), and the gate and up halves live in separate contiguous buffers:
    the SwiGLU elementwise work then runs on contiguous memory (on the interleaved (T, 2I) layout its backward took
    1.8x as long, measured op by op at the tiny size)."""

    @staticmethod
    def forward(ctx, hidden, expert_ids, weights, gate_up, down):
        # ids and weights (T,) or as the router returns them, (T, 1): no view node between the router and this one
        ctx.weights_shape = weights.shape
        expert_ids, weights = expert_ids.reshape(-1), weights.reshape(-1)
        counts = torch.bincount(expert_ids, minlength=gate_up.size(0)).tolist()  # the one host sync
        perm = torch.argsort(expert_ids, stable=True)  # (T,) rows in expert order
        inv = torch.argsort(perm)  # (T,) back to token order
        x = hidden.index_select(0, perm)  # (T, H)
        g, u, act, h, y = grouped_swiglu_forward(x, counts, gate_up, down)
        w = weights.index_select(0, perm).unsqueeze(-1)  # (T, 1)
        ctx.save_for_backward(perm, inv, x, g, u, act, h, y, w, gate_up, down)
        ctx.counts = counts
        return (y * w).index_select(0, inv)  # (T, H), token order

    @staticmethod
    def backward(ctx, grad_out):
        perm, inv, x, g, u, act, h, y, w, gate_up, down = ctx.saved_tensors
        need_x, _, need_w, need_gate_up, need_down = ctx.needs_input_grad
        go = grad_out.index_select(0, perm)  # (T, H), expert order
        grad_w = torch.linalg.vecdot(go, y).index_select(0, inv) if need_w else None  # (T,)
        gy = go.mul_(w)  # (T, H): gradient of y (go is a fresh gather: in place is safe)
        gx, grad_gate_up, grad_down = grouped_swiglu_backward(
            gy, ctx.counts, x, g, u, act, h, gate_up, down, need_x, need_gate_up, need_down
        )
        grad_x = gx.index_select(0, inv) if need_x else None
        grad_w = grad_w.view(ctx.weights_shape) if need_w else None
        return grad_x, None, grad_w, grad_gate_up, grad_down


def _call_top1(kernel, name: str, module, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """What both registered forwards do around their kernel: check that `module` and the routing are ones it serves,
    and call `kernel(hidden, ids, weights, gate_up, down)` with the top-1 index and weights as the router returns
    them, (T, 1) (each kernel flattens them inside, so the graph gets no view node)."""
    _check_supported(module, top_k_index, name)
    # (T, H), in hidden_states' dtype: every buffer is allocated from it
    return kernel(
        hidden_states,
        top_k_index,
        top_k_weights.to(hidden_states.dtype),
        module.gate_up_proj,
        module.down_proj,
    )


def sorted_top1_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The `ExpertsInterface` signature: hidden_states (T, H), top_k_index / top_k_weights (T, 1) -> (T, H)."""
    return _call_top1(_SortedTop1Experts.apply, KERNEL_NAME, self, hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(KERNEL_NAME, sorted_top1_experts_forward)


# ----- sorted_top1_cpp: the same kernel compiled ------------------------------------------------------------------

CPP_KERNEL_NAME = "sorted_top1_cpp"


def _compiled():
    """The compiled extension (`cpp_kernels.py`), or an error that says what to install and that `sorted_top1`, the
    same kernel in Python, needs neither."""
    return compiled_for(
        f'experts_implementation="{CPP_KERNEL_NAME}"',
        f'experts_implementation="{KERNEL_NAME}", the same kernel in Python',
    )


def sorted_top1_cpp_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """`sorted_top1_experts_forward` through the compiled kernel: hidden_states (T, H), top_k_* (T, 1) -> (T, H)."""
    return _call_top1(
        _compiled().sorted_top1, CPP_KERNEL_NAME, self, hidden_states, top_k_index, top_k_weights
    )


ExpertsInterface.register(CPP_KERNEL_NAME, sorted_top1_cpp_experts_forward)
