"""The compiled kernels of the tiny CPU path, one C++ extension built on first use with torch's `cpp_extension`
(g++ and ninja; about a minute the first time on 2 cores, cached under `~/.cache/torch_extensions`):

- `sorted_top1`: the experts kernel `experts_implementation="sorted_top1_cpp"` calls (`experts_kernels.py`). The
  function of the Python `_SortedTop1Experts` (stable sort by expert, per-expert matmuls, written-out SwiGLU
  backward) as one `torch::autograd::Function`. On CPU the permutation is a counting sort, each gather is fused with
  the multiply by the gate weight (one pass over the rows instead of a gather and a multiply), and SwiGLU's
  elementwise part is one pass forward (after aten's sigmoid) and one backward (instead of three aten calls), on the
  gate and up halves of one buffer so that each expert needs one matmul for both; elsewhere the same formulas run as
  aten calls.
- `route_top1`: the router's top-1 decision `router_implementation="fused_cpp"` runs (`router_kernels.py`): the
  logits, the straight-through Gumbel-softmax (or softmax, argmax, modality) choice and the weight the expert output
  is multiplied by in one pass over the tokens, and their backward into the hidden states and the router weight
  (one pass for the logits' gradient, then two matmuls).

Why compiled: at the embedded default's size (hidden 128, two experts, ~500 tokens a batch) a dense MLP's forward +
backward takes a few milliseconds, and what an MoE block costs beyond it is per-operation Python and autograd-node
overhead (README, Benchmarks), not arithmetic. torch has no compiled top-1 experts kernel or Gumbel router for CPU
and no well-kept library ships one, hence written here. Kept as a string in a Python file (not a .cpp beside it)
because transformers' remote code copies only the Python files the modeling file imports.
"""

from __future__ import annotations

import functools
import subprocess

EXTENSION_NAME = "moe_vlm_kernels"

_CPP_SOURCE = r"""
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <cmath>
#include <cstring>

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ----- shared helpers -----------------------------------------------------------------------------------------------

// mm into a view (at::mm_out takes its out by lvalue reference)
static void mm_into(Tensor out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b); }

// out[i, :] = src[index[i], :] * (scale ? scale[i] : 1) for i < rows: a row gather fused with a per-row multiply
// (the same single rounding as aten's gather followed by `*`). CPU, contiguous (rows, width) tensors.
static void gather_rows(Tensor& out, const Tensor& src, const Tensor& index, const Tensor& scale) {
  const int64_t rows = index.size(0), width = src.size(1);
  const int64_t* idx = index.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "gather_rows", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* w = scale.defined() ? scale.data_ptr<scalar_t>() : nullptr;
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* from = s + idx[i] * width;
      scalar_t* to = o + i * width;
      if (!w) {
        std::memcpy(to, from, width * sizeof(scalar_t));
      } else {
        const scalar_t wi = w[i];
        for (int64_t j = 0; j < width; ++j) to[j] = from[j] * wi;
      }
    }
  });
}

// sum_j a[j] * b[j] in acc_t, over eight running sums (element j into sum j % 8) added pairwise at the end: one
// running sum cannot be vectorised without -ffast-math (the compiler may not reorder float additions) and waits an
// add's latency per element; eight independent ones vectorise and pipeline. Measured on the gumbel block's backward
// (tiny, 512 tokens x 128): 15-43 us less a call of the experts alone, of about 3.5 ms, in four paired runs.
template <typename scalar_t, typename acc_t>
static acc_t dot_rows(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t n) {
  acc_t lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int u = 0; u < 8; ++u) lane[u] += acc_t(a[j + u]) * acc_t(b[j + u]);
  acc_t sum = ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
  for (; j < n; ++j) sum += acc_t(a[j]) * acc_t(b[j]);
  return sum;
}

// ----- sorted_top1: the experts --------------------------------------------------------------------------------------

// SwiGLU's elementwise part on the gate and up halves of one (T, 2I) buffer gu (one matmul per expert writes both):
// h = silu(g) * u = g * s * u with s = sigmoid(g) (T, I), s kept for the backward. On CPU one pass after aten's
// vectorised sigmoid, and the backward one pass with no exp, where autograd's is three (gh * u, silu_backward,
// gh * silu(g)); in float, rounded once, for reduced-precision types. Elsewhere the same formulas as aten calls.
static void swiglu_forward(const Tensor& gu, Tensor& s, Tensor& h) {
  const int64_t rows = gu.size(0), inter = gu.size(1) / 2;
  const Tensor g = gu.narrow(1, 0, inter), u = gu.narrow(1, inter, inter);
  s = at::sigmoid(g.to(at::toOpMathType(gu.scalar_type()))).contiguous();  // (T, I) in the loops' acc_t
  if (!gu.device().is_cpu()) {
    h = (g * s * u).to(gu.scalar_type());
    return;
  }
  h = at::empty({rows, inter}, gu.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gu.scalar_type(), "swiglu_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gu0 = gu.data_ptr<scalar_t>();
    const acc_t* s0 = s.data_ptr<acc_t>();
    scalar_t* h0 = h.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* __restrict__ gp = gu0 + r * 2 * inter;
      const scalar_t* __restrict__ up = gp + inter;
      const acc_t* __restrict__ sp = s0 + r * inter;
      scalar_t* __restrict__ hp = h0 + r * inter;
      for (int64_t i = 0; i < inter; ++i) hp[i] = scalar_t(acc_t(gp[i]) * sp[i] * acc_t(up[i]));
    }
  });
}

// d/dg of g * s * u is u * s * (1 + g * (1 - s)) (silu's derivative, as aten's silu_backward), d/du is g * s: gh
// (T, I) -> dgu (T, 2I), the gate half's gradient then the up half's, ready for one matmul per expert.
static Tensor swiglu_backward(const Tensor& gh, const Tensor& gu, const Tensor& s) {
  const int64_t rows = gu.size(0), inter = gu.size(1) / 2;
  if (!gu.device().is_cpu()) {
    const Tensor g = gu.narrow(1, 0, inter), u = gu.narrow(1, inter, inter);
    return at::cat({gh * u * s * (1 + g * (1 - s)), gh * g * s}, 1).to(gu.scalar_type());
  }
  Tensor dgu = at::empty_like(gu);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gu.scalar_type(), "swiglu_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gh0 = gh.data_ptr<scalar_t>(), *gu0 = gu.data_ptr<scalar_t>();
    const acc_t* s0 = s.data_ptr<acc_t>();
    scalar_t* dgu0 = dgu.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* __restrict__ ghp = gh0 + r * inter;
      const scalar_t* __restrict__ gp = gu0 + r * 2 * inter;
      const scalar_t* __restrict__ up = gp + inter;
      const acc_t* __restrict__ sp = s0 + r * inter;
      scalar_t* __restrict__ dgp = dgu0 + r * 2 * inter;
      scalar_t* __restrict__ dup = dgp + inter;
      for (int64_t i = 0; i < inter; ++i) {
        const acc_t d = acc_t(ghp[i]), x = acc_t(gp[i]), si = sp[i];
        dup[i] = scalar_t(d * (x * si));
        dgp[i] = scalar_t(d * acc_t(up[i]) * si * (acc_t(1) + x * (acc_t(1) - si)));
      }
    }
  });
  return dgu;
}

// Rows of x are in expert order: counts[0] rows through expert 0, then counts[1] through expert 1, ...
// x (T, H) -> gu (T, 2I) the gate and up projections, s (T, I) sigmoid of the gate, h (T, I), y (T, H)
static void grouped_swiglu_forward(const Tensor& x, const std::vector<int64_t>& counts, const Tensor& gate_up,
                                   const Tensor& down, Tensor& gu, Tensor& s, Tensor& h, Tensor& y) {
  const int64_t rows = x.size(0);
  gu = at::empty({rows, gate_up.size(1)}, x.options());
  y = at::empty({rows, down.size(1)}, x.options());
  int64_t off = 0;
  for (size_t e = 0; e < counts.size(); ++e) {
    const int64_t n = counts[e];
    if (!n) continue;
    mm_into(gu.narrow(0, off, n), x.narrow(0, off, n), gate_up.select(0, e).t());
    off += n;
  }
  swiglu_forward(gu, s, h);
  off = 0;
  for (size_t e = 0; e < counts.size(); ++e) {
    const int64_t n = counts[e];
    if (!n) continue;
    mm_into(y.narrow(0, off, n), h.narrow(0, off, n), down.select(0, e).t());
    off += n;
  }
}

static Tensor weight_grad(const Tensor& weight, const std::vector<int64_t>& counts) {
  Tensor grad = at::empty_like(weight);
  for (size_t e = 0; e < counts.size(); ++e)
    if (!counts[e]) grad.select(0, e).zero_();
  return grad;
}

// A stable counting sort of the expert ids (T,): counts per expert, perm (T,) the tokens in expert order and inv (T,)
// each token's row in that order (argsort(perm)). One pass, no host sync beyond the ids themselves.
static void counting_sort(const Tensor& ids, int64_t num_experts, std::vector<int64_t>& counts, Tensor& perm,
                          Tensor& inv) {
  const int64_t tokens = ids.size(0);
  const int64_t* id = ids.data_ptr<int64_t>();
  counts.assign(num_experts, 0);
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(id[t] >= 0 && id[t] < num_experts, "sorted_top1: expert index ", id[t], " is not in [0, ",
                num_experts, ")");
    ++counts[id[t]];
  }
  std::vector<int64_t> next(num_experts, 0);
  for (int64_t e = 1; e < num_experts; ++e) next[e] = next[e - 1] + counts[e - 1];
  perm = at::empty({tokens}, ids.options());
  inv = at::empty({tokens}, ids.options());
  int64_t *p = perm.data_ptr<int64_t>(), *q = inv.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t row = next[id[t]]++;
    p[row] = t;
    q[t] = row;
  }
}

struct SortedTop1 : public torch::autograd::Function<SortedTop1> {
  static Tensor forward(AutogradContext* ctx, const Tensor& hidden_in, const Tensor& expert_ids,
                        const Tensor& weights_in, const Tensor& gate_up, const Tensor& down) {
    const int64_t num_experts = gate_up.size(0), tokens = hidden_in.size(0);
    const bool cpu = hidden_in.device().is_cpu();
    // (T, H) and (T,): the weights and ids arrive (T,) or as the router returns them, (T, 1), so that no view node
    // enters the autograd graph between the router and this one
    const Tensor hidden = hidden_in.contiguous(), weights = weights_in.reshape({-1}).contiguous();
    const Tensor ids = expert_ids.reshape({-1});
    std::vector<int64_t> counts;
    Tensor perm, inv, x;  // (T,) expert order, (T,) token order, (T, H) rows in expert order
    if (cpu) {
      counting_sort(ids.to(at::kLong).contiguous(), num_experts, counts, perm, inv);
      x = at::empty_like(hidden);
      gather_rows(x, hidden, perm, Tensor());
    } else {
      const Tensor counts_t = at::bincount(ids, {}, num_experts).cpu();  // the one host sync
      const int64_t* c = counts_t.data_ptr<int64_t>();
      counts.assign(c, c + num_experts);
      perm = std::get<1>(at::sort(ids, /*stable=*/true, 0, false));
      inv = at::argsort(perm);
      x = hidden.index_select(0, perm);
    }
    Tensor gu, s, h, y;  // (T, 2I) gate and up, (T, I) sigmoid(gate) (float) and h = silu(g) * u, (T, H) y
    grouped_swiglu_forward(x, counts, gate_up, down, gu, s, h, y);
    Tensor out;  // (T, H), token order: y's row of each token times its gate weight
    if (cpu) {
      out = at::empty({tokens, y.size(1)}, y.options());
      gather_rows(out, y, inv, weights);
    } else {
      out = (y * weights.index_select(0, perm).unsqueeze(-1)).index_select(0, inv);
    }
    ctx->save_for_backward({perm, inv, x, gu, s, h, y, weights, gate_up, down});
    ctx->saved_data["counts"] = counts;
    ctx->saved_data["weights_shape"] = weights_in.sizes().vec();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &perm = saved[0], &inv = saved[1], &x = saved[2], &gu = saved[3], &s = saved[4], &h = saved[5],
                 &y = saved[6], &weights = saved[7], &gate_up = saved[8], &down = saved[9];
    const std::vector<int64_t> counts = ctx->saved_data["counts"].toIntVector();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(2);
    const bool need_gate_up = ctx->needs_input_grad(3), need_down = ctx->needs_input_grad(4);
    const int64_t tokens = perm.size(0), width = y.size(1);
    const Tensor grad_out = grad_outputs[0].contiguous();  // (T, H), token order
    Tensor gy, grad_w;  // (T, H) the gradient of y, in expert order; (T,) of the gate weights
    if (x.device().is_cpu()) {
      // one pass over the rows: gather the output gradient, its dot with y (the weight's gradient) and times w
      gy = at::empty_like(y);
      if (need_w) grad_w = at::empty_like(weights);
      const int64_t* p = perm.data_ptr<int64_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "sorted_top1_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t *go = grad_out.data_ptr<scalar_t>(), *yy = y.data_ptr<scalar_t>(),
                       *w = weights.data_ptr<scalar_t>();
        scalar_t* out = gy.data_ptr<scalar_t>();
        scalar_t* gw = need_w ? grad_w.data_ptr<scalar_t>() : nullptr;
        for (int64_t i = 0; i < tokens; ++i) {
          const scalar_t* from = go + p[i] * width;
          const scalar_t* yi = yy + i * width;
          scalar_t* to = out + i * width;
          const scalar_t wi = w[p[i]];
          if (gw) gw[p[i]] = scalar_t(dot_rows<scalar_t, acc_t>(from, yi, width));
          for (int64_t j = 0; j < width; ++j) to[j] = from[j] * wi;
        }
      });
    } else {
      Tensor go = grad_out.index_select(0, perm);  // (T, H), expert order
      if (need_w) grad_w = at::linalg_vecdot(go, y).index_select(0, inv);
      gy = go.mul_(weights.index_select(0, perm).unsqueeze(-1));
    }
    Tensor gh = at::empty_like(h);
    Tensor grad_down = need_down ? weight_grad(down, counts) : Tensor();
    int64_t off = 0;
    for (size_t e = 0; e < counts.size(); ++e) {
      const int64_t n = counts[e];
      if (!n) continue;
      mm_into(gh.narrow(0, off, n), gy.narrow(0, off, n), down.select(0, e));
      if (need_down) mm_into(grad_down.select(0, e), gy.narrow(0, off, n).t(), h.narrow(0, off, n));
      off += n;
    }
    const Tensor dgu = swiglu_backward(gh, gu, s);  // (T, 2I)
    Tensor grad_gate_up = need_gate_up ? weight_grad(gate_up, counts) : Tensor();
    Tensor gx = need_x ? at::empty_like(x) : Tensor();
    off = 0;
    for (size_t e = 0; e < counts.size(); ++e) {
      const int64_t n = counts[e];
      if (!n) continue;
      const Tensor dgus = dgu.narrow(0, off, n);
      if (need_x) mm_into(gx.narrow(0, off, n), dgus, gate_up.select(0, e));
      if (need_gate_up) mm_into(grad_gate_up.select(0, e), dgus.t(), x.narrow(0, off, n));
      off += n;
    }
    Tensor grad_x;
    if (need_x) {
      if (x.device().is_cpu()) {
        grad_x = at::empty_like(gx);
        gather_rows(grad_x, gx, inv, Tensor());
      } else {
        grad_x = gx.index_select(0, inv);
      }
    }
    if (need_w) grad_w = grad_w.view(ctx->saved_data["weights_shape"].toIntVector());
    return {grad_x, Tensor(), grad_w, grad_gate_up, grad_down};
  }
};

Tensor sorted_top1(const Tensor& hidden, const Tensor& expert_ids, const Tensor& weights, const Tensor& gate_up,
                   const Tensor& down) {
  return SortedTop1::apply(hidden, expert_ids, weights, gate_up, down);
}

// ----- route_top1: the router ---------------------------------------------------------------------------------------

// What decides a token's expert (the `kind` argument; router_kernels.py maps the router mode to it):
enum RouteKind : int64_t {
  kStraightThroughGumbel = 0,  // gumbel / modality_aware in training: argmax of softmax((d + g) / tau), weight 1
                               // with the soft sample's gradient (F.gumbel_softmax(hard=True))
  kArgmax = 1,                 // gumbel / modality_aware in eval: argmax of d, weight 1, no gradient
  kSoftmax = 2,                // softmax top-1: argmax of p = softmax(d), weight p (Switch)
  kModality = 3,               // hard: the modality's expert, weight 1, no gradient
};

// An absent optional input or saved tensor: one empty tensor, allocated once (autograd's apply takes no undefined
// tensors), and the test for a given one
static const Tensor& none() {
  static const Tensor empty = at::empty({0});
  return empty;
}
static bool given(const Tensor& t) { return t.numel() > 0; }

// The kinds whose weight is the soft probability's (with its gradient) and whose probabilities are saved
static bool is_soft(int64_t kind) { return kind == kStraightThroughGumbel || kind == kSoftmax; }

// logits = hidden @ weight.T (+ offset); d = logits (* drop) (+ bias), in float32 as the eager router's `.float()`.
struct RouteTop1 : public torch::autograd::Function<RouteTop1> {
  static variable_list forward(AutogradContext* ctx, const Tensor& hidden_in, const Tensor& weight_in,
                               const Tensor& offset_in, const Tensor& drop_in, const Tensor& bias_in,
                               const Tensor& is_image_in, double tau, int64_t kind, int64_t vision, int64_t text) {
    TORCH_CHECK(hidden_in.device().is_cpu(), "route_top1 runs on CPU tensors");
    const Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous();
    const int64_t tokens = hidden.size(0), experts = weight.size(0);
    const Tensor offset = given(offset_in) ? offset_in.to(hidden.scalar_type()).contiguous() : Tensor();
    const Tensor drop = given(drop_in) ? drop_in.to(hidden.scalar_type()).contiguous() : Tensor();
    const Tensor bias = given(bias_in) ? bias_in.to(hidden.scalar_type()).contiguous() : Tensor();
    const Tensor is_image = given(is_image_in) ? is_image_in.to(at::kBool).contiguous() : Tensor();
    TORCH_CHECK(kind != kModality || is_image.defined(), "route_top1: modality routing needs is_image");
    const bool soft = is_soft(kind);
    // the Gumbel noise, drawn as F.gumbel_softmax draws it (one exponential_ over a (T, E) float32 tensor, then its
    // log, aten's vectorised one as there), so the random stream and the noise are those of the eager router
    const Tensor log_noise =
        kind == kStraightThroughGumbel
            ? at::empty({tokens, experts}, hidden.options().dtype(at::kFloat)).exponential_().log_()
            : Tensor();
    // (E, T): weight @ hidden.T, a third of the time of hidden @ weight.T at (512, 128) x (128, 2) (MKL)
    const Tensor raw = at::mm(weight, hidden.t());
    Tensor logits = at::empty({tokens, experts}, hidden.options());
    Tensor weights = at::empty({tokens, 1}, hidden.options());
    Tensor index = at::empty({tokens, 1}, hidden.options().dtype(at::kLong));
    Tensor probs = soft ? at::empty({tokens, experts}, hidden.options().dtype(at::kFloat)) : none();
    const float tau_f = static_cast<float>(tau);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "route_top1", [&] {
      const scalar_t* r = raw.data_ptr<scalar_t>();
      const scalar_t* off = offset.defined() ? offset.data_ptr<scalar_t>() : nullptr;
      const scalar_t* dr = drop.defined() ? drop.data_ptr<scalar_t>() : nullptr;
      const scalar_t* b = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
      const bool* img = is_image.defined() ? is_image.data_ptr<bool>() : nullptr;
      const float* nz = log_noise.defined() ? log_noise.data_ptr<float>() : nullptr;
      scalar_t *lg = logits.data_ptr<scalar_t>(), *wt = weights.data_ptr<scalar_t>();
      int64_t* ix = index.data_ptr<int64_t>();
      float* pr = soft ? probs.data_ptr<float>() : nullptr;
      std::vector<float> z(experts);
      for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t e = 0; e < experts; ++e) {
          scalar_t l = r[e * tokens + t];
          if (off) l = l + off[t * experts + e];
          lg[t * experts + e] = l;
          scalar_t d = l;
          if (dr) d = d * dr[t * experts + e];
          if (b) d = d + b[e];
          z[e] = static_cast<float>(d);
        }
        int64_t k = 0;
        float weight_value = 1.0f;
        if (kind == kModality) {
          k = img[t] ? vision : text;
        } else {
          if (kind == kStraightThroughGumbel)
            for (int64_t e = 0; e < experts; ++e) z[e] = (z[e] + -nz[t * experts + e]) / tau_f;
          for (int64_t e = 1; e < experts; ++e)
            if (z[e] > z[k]) k = e;  // the first maximum, as argmax
          if (soft) {  // softmax over the experts, max-subtracted as aten's (exp(0) = 1 at the maximum)
            float* p = pr + t * experts;
            float sum = 0.0f;
            for (int64_t e = 0; e < experts; ++e) sum += (p[e] = e == k ? 1.0f : std::exp(z[e] - z[k]));
            for (int64_t e = 0; e < experts; ++e) p[e] /= sum;
            // straight-through: y_hard - y_soft.detach() + y_soft at the chosen expert; softmax: p itself
            weight_value = kind == kStraightThroughGumbel ? (1.0f - p[k]) + p[k] : p[k];
          }
        }
        ix[t] = k;
        wt[t] = scalar_t(weight_value);
      }
    });
    ctx->mark_non_differentiable(soft ? variable_list{index} : variable_list{index, weights});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({hidden, weight, drop.defined() ? drop : none(), probs, index});
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["tau"] = tau;
    return {logits, weights, index};
  }

  // The gradient of the logits: what the returned logits receive, plus (soft kinds) what the weight passes back
  // through the softmax: d weight_t / d z_tj = p_tj (delta_jk - p_tk), over tau for the Gumbel sample, times the
  // dropout scale. Then into the hidden states (dl @ weight) and the router weight (dl.T @ hidden).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &hidden = saved[0], &weight = saved[1], &drop = saved[2], &probs = saved[3], &index = saved[4];
    const int64_t kind = ctx->saved_data["kind"].toInt();
    const float tau = static_cast<float>(ctx->saved_data["tau"].toDouble());
    const bool has_drop = given(drop);
    const int64_t tokens = hidden.size(0), experts = weight.size(0);
    const Tensor g_logits = grads[0].defined() ? grads[0].to(hidden.scalar_type()).contiguous() : Tensor();
    const Tensor g_weights = grads[1].defined() ? grads[1].to(hidden.scalar_type()).contiguous() : Tensor();
    const bool soft = is_soft(kind);
    const bool need_hidden = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1),
               need_offset = ctx->needs_input_grad(2);
    // (T, E) the logits' gradient
    const bool through_weight = soft && g_weights.defined();
    Tensor dl = g_logits.defined() ? g_logits.clone()
                : through_weight     ? at::empty({tokens, experts}, hidden.options())  // written below
                                     : at::zeros({tokens, experts}, hidden.options());
    if (through_weight) {
      const bool add = g_logits.defined();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "route_top1_backward", [&] {
        scalar_t* d = dl.data_ptr<scalar_t>();
        const scalar_t* gw = g_weights.data_ptr<scalar_t>();
        const float* p = probs.data_ptr<float>();
        const int64_t* ix = index.data_ptr<int64_t>();
        const scalar_t* dr = has_drop ? drop.data_ptr<scalar_t>() : nullptr;
        for (int64_t t = 0; t < tokens; ++t) {
          const float* pt = p + t * experts;
          const int64_t k = ix[t];
          const float g = static_cast<float>(gw[t]);
          for (int64_t j = 0; j < experts; ++j) {
            float dz = g * pt[j] * ((j == k ? 1.0f : 0.0f) - pt[k]);
            if (kind == kStraightThroughGumbel) dz = dz / tau;
            scalar_t dd = scalar_t(dz);
            if (dr) dd = dd * dr[t * experts + j];
            d[t * experts + j] = add ? d[t * experts + j] + dd : dd;
          }
        }
      });
    }
    Tensor grad_hidden = need_hidden ? at::mm(dl, weight) : Tensor();      // (T, H) = dl (T, E) @ weight (E, H)
    Tensor grad_weight = need_weight ? at::mm(dl.t(), hidden) : Tensor();  // (E, H) = dl.T (E, T) @ hidden (T, H)
    return {grad_hidden, grad_weight, need_offset ? dl : Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::vector<Tensor> route_top1(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& offset,
                               const c10::optional<Tensor>& drop, const c10::optional<Tensor>& bias,
                               const c10::optional<Tensor>& is_image, double tau, int64_t kind, int64_t vision,
                               int64_t text) {
  return RouteTop1::apply(hidden, weight, offset.value_or(none()), drop.value_or(none()), bias.value_or(none()),
                          is_image.value_or(none()), tau, kind, vision, text);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sorted_top1", &sorted_top1);
  m.def("route_top1", &route_top1);
}
"""


class BuildError(RuntimeError):
    """The extension did not build (no compiler, no ninja): the message says what to install."""


def compiled_for(selected: str, instead: str):
    """The extension for the kernel the user `selected` (e.g. `router_implementation="fused_cpp"`), or a
    RuntimeError that names it, what to install, and `instead`: the pure-PyTorch choice that needs neither."""
    try:
        return compiled()
    except BuildError as error:
        raise RuntimeError(f"{selected}: {error}, or use {instead}.") from error


@functools.cache
def compiled():
    """Build the extension once per machine (torch caches it under $TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions:
    about a minute the first time on 2 cores, a second after) and load it. Raises `BuildError` naming what to
    install; `compiled_for` adds which pure-PyTorch path needs neither."""
    from torch.utils.cpp_extension import load_inline

    try:
        return load_inline(name=EXTENSION_NAME, cpp_sources=_CPP_SOURCE, extra_cflags=["-O3"])
    except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
        raise BuildError(
            f"it builds a C++ extension on first use and the build failed "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Install a C++ compiler "
            "(g++) and ninja (`pip install ninja`)"
        ) from error
