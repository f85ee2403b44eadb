// Autograd of the moe_ops kernels, registered once for every device under the Autograd key.
//
// Each op's backward is other moe_ops ops (their CPU / CUDA kernels and fake kernels are
// registered beside them), so `torch.compile` traces forward and backward through the fake
// kernels. Kept in C++ rather than `torch.library.register_autograd`: the Python route costs
// about 0.15-0.6 ms per op and step (saving the context, wrapping the backward), which at a
// small model's sizes is as much as the kernels themselves (see README, Kernels).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace moe_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<Tensor>;

// A handle on one moe_ops op through the dispatcher (its CPU, CUDA or fake kernel).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// ---- fused element-wise kernels (fused_cpu.cpp) ------------------------------------------

class RmsNorm : public torch::autograd::Function<RmsNorm> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               c10::IntArrayRef group_rows, double eps) {
    static auto fwd = op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                    c10::IntArrayRef, double)>("moe_ops::rms_norm");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, rstd] = fwd.call(x, weight, group_rows, eps);
    ctx->save_for_backward({x, weight, rstd});
    ctx->saved_data["group_rows"] = group_rows.vec();
    ctx->mark_non_differentiable({rstd});
    return {y, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                    const Tensor&, c10::IntArrayRef)>(
        "moe_ops::rms_norm_backward");
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
    auto saved = ctx->get_saved_variables();
    auto group_rows = ctx->saved_data["group_rows"].toIntVector();
    auto [gx, gw] = bwd.call(grads[0].contiguous(), saved[0], saved[1], saved[2], group_rows);
    return {gx, gw, Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> rms_norm_autograd(const Tensor& x, const Tensor& weight,
                                             c10::IntArrayRef group_rows, double eps) {
  auto out = RmsNorm::apply(x, weight, group_rows, eps);
  return {out[0], out[1]};
}

class Swiglu : public torch::autograd::Function<Swiglu> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& b) {
    static auto fwd = op<Tensor(const Tensor&, const Tensor&)>("moe_ops::swiglu");
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({a, b});
    return fwd.call(a, b);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&)>(
        "moe_ops::swiglu_backward");
    auto saved = ctx->get_saved_variables();
    auto [ga, gb] = bwd.call(grads[0].contiguous(), saved[0], saved[1]);
    return {ga, gb};
  }
};

Tensor swiglu_autograd(const Tensor& a, const Tensor& b) { return Swiglu::apply(a, b); }

class Rotary : public torch::autograd::Function<Rotary> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& cos,
                        const Tensor& sin, bool transpose) {
    static auto fwd = op<Tensor(const Tensor&, const Tensor&, const Tensor&, bool)>(
        "moe_ops::rotary");
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["transpose"] = transpose;
    ctx->saved_data["dtype"] = x.scalar_type();
    return fwd.call(x, cos, sin, transpose);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto fwd = op<Tensor(const Tensor&, const Tensor&, const Tensor&, bool)>(
        "moe_ops::rotary");
    auto saved = ctx->get_saved_variables();
    Tensor grad = grads[0].stride(-1) == 1 ? grads[0] : grads[0].contiguous();
    // the rotation by -angle: the same kernel with the other sign
    Tensor gx = fwd.call(grad, saved[0], saved[1], !ctx->saved_data["transpose"].toBool())
                    .to(ctx->saved_data["dtype"].toScalarType());
    return {gx, Tensor(), Tensor(), Tensor()};
  }
};

Tensor rotary_autograd(const Tensor& x, const Tensor& cos, const Tensor& sin, bool transpose) {
  return Rotary::apply(x, cos, sin, transpose);
}

// qkv_heads -> (q, k, v); the backward writes the projection's gradient in one buffer. The
// inputs are kept (not the outputs): the backward recomputes each head's norm statistics.
class QkvHeads : public torch::autograd::Function<QkvHeads> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& qkv, const OptTensor& src,
                               const OptTensor& group, const OptTensor& q_weight,
                               const OptTensor& k_weight, const Tensor& cos, const Tensor& sin,
                               int64_t heads, int64_t kv_heads, double eps) {
    static auto fwd = op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
        const Tensor&, const Tensor&, int64_t, int64_t, double)>("moe_ops::qkv_heads");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [q, k, v] = fwd.call(qkv, src, group, q_weight, k_weight, cos, sin, heads, kv_heads,
                              eps);
    ctx->save_for_backward({qkv, src.value_or(Tensor()), group.value_or(Tensor()),
                            q_weight.value_or(Tensor()), k_weight.value_or(Tensor()), cos, sin});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["kv_heads"] = kv_heads;
    return {q, k, v};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
        const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
        double)>("moe_ops::qkv_heads_backward");
    auto saved = ctx->get_saved_variables();
    auto opt = [](const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
    const Tensor& qkv = saved[0];
    const Tensor& cos = saved[5];
    // an unused output's gradient: zeros; any layout with a contiguous last dimension is read
    // in place (attention hands back (B, H, T, hd) gradients seen as (B, T, H, hd))
    auto ready = [&](const Tensor& g, int64_t heads, const Tensor& like) {
      if (!g.defined()) {
        return at::zeros({cos.size(0), cos.size(1), heads, cos.size(2)}, like.options());
      }
      return g.stride(-1) == 1 ? g : g.contiguous();
    };
    const int64_t H = ctx->saved_data["heads"].toInt(), KV = ctx->saved_data["kv_heads"].toInt();
    auto [gx, gqw, gkw] = bwd.call(ready(grads[0], H, cos), ready(grads[1], KV, cos),
                                   ready(grads[2], KV, qkv), qkv, opt(saved[1]), opt(saved[2]),
                                   opt(saved[3]), opt(saved[4]), cos, saved[6],
                                   ctx->saved_data["eps"].toDouble());
    const bool norm = saved[3].defined();
    return {gx, Tensor(), Tensor(), norm ? gqw : Tensor(), norm ? gkw : Tensor(), Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> qkv_heads_autograd(
    const Tensor& qkv, const OptTensor& src, const OptTensor& group, const OptTensor& q_weight,
    const OptTensor& k_weight, const Tensor& cos, const Tensor& sin, int64_t heads,
    int64_t kv_heads, double eps) {
  auto out = QkvHeads::apply(qkv, src, group, q_weight, k_weight, cos, sin, heads, kv_heads, eps);
  return {out[0], out[1], out[2]};
}

// ---- router (router_cpu.cpp) -------------------------------------------------------------

// router_topk -> (scores, expert, weight, lse, prob_sum, entropy); expert and entropy carry no
// gradient. Sigmoid scores do not give d lse / d logits (a softmax): the logits are kept for it.
class RouterTopk : public torch::autograd::Function<RouterTopk> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const OptTensor& bias,
                               int64_t k, bool renormalize, bool sigmoid) {
    static auto fwd = op<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
        const Tensor&, const OptTensor&, int64_t, bool, bool)>("moe_ops::router_topk");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [scores, expert, weight, lse, prob_sum, entropy] =
        fwd.call(logits, bias, k, renormalize, sigmoid);
    ctx->save_for_backward({scores, expert, sigmoid ? logits : Tensor()});
    ctx->saved_data["renormalize"] = renormalize;
    ctx->saved_data["sigmoid"] = sigmoid;
    ctx->saved_data["dtype"] = logits.scalar_type();
    ctx->mark_non_differentiable({expert, entropy});
    return {scores, expert, weight, lse, prob_sum, entropy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<Tensor(const OptTensor&, const OptTensor&, const OptTensor&,
                                const OptTensor&, const Tensor&, const Tensor&, bool, bool)>(
        "moe_ops::router_topk_backward");
    auto saved = ctx->get_saved_variables();
    const bool sigmoid = ctx->saved_data["sigmoid"].toBool();
    auto f32 = [](const Tensor& g) -> OptTensor {
      if (!g.defined()) return std::nullopt;
      return g.to(at::kFloat).contiguous();
    };
    const Tensor& grad_lse = grads[3];
    Tensor grad = bwd.call(f32(grads[0]), f32(grads[2]), sigmoid ? std::nullopt : f32(grad_lse),
                           f32(grads[4]), saved[0], saved[1],
                           ctx->saved_data["renormalize"].toBool(), sigmoid);
    if (sigmoid && grad_lse.defined()) {
      grad = grad + grad_lse.to(at::kFloat).unsqueeze(1) * at::softmax(saved[2].to(at::kFloat), -1);
    }
    return {grad.to(ctx->saved_data["dtype"].toScalarType()), Tensor(), Tensor(), Tensor(),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> router_topk_autograd(
    const Tensor& logits, const OptTensor& bias, int64_t k, bool renormalize, bool sigmoid) {
  auto out = RouterTopk::apply(logits, bias, k, renormalize, sigmoid);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

// ---- permute / unpermute (moe_ops.cpp): each is the other's backward -----------------------

using RowsOp = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, int64_t,
                      int64_t);

OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The forward of either row op: keeps what both backwards need, runs `name` below autograd.
Tensor rows_forward(AutogradContext* ctx, const c10::TypedOperatorHandle<RowsOp>& fwd,
                    const Tensor& source, const Tensor& order, const Tensor& inverse,
                    const OptTensor& weights, int64_t k, int64_t kept) {
  at::AutoDispatchBelowADInplaceOrView below;
  ctx->save_for_backward({source, order, inverse, weights.value_or(Tensor())});
  ctx->saved_data["k"] = k;
  ctx->saved_data["kept"] = kept;
  return fwd.call(source, order, inverse, weights, k, kept);
}

class PermuteRows : public torch::autograd::Function<PermuteRows> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& order,
                        const Tensor& inverse, const OptTensor& weights, int64_t k,
                        int64_t kept) {
    static auto fwd = op<RowsOp>("moe_ops::permute_rows");
    return rows_forward(ctx, fwd, x, order, inverse, weights, k, kept);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto unpermute = op<RowsOp>("moe_ops::unpermute_rows");
    static auto dots = op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 int64_t, int64_t)>("moe_ops::slot_dots");
    auto saved = ctx->get_saved_variables();
    const int64_t k = ctx->saved_data["k"].toInt(), kept = ctx->saved_data["kept"].toInt();
    Tensor grad = grads[0].contiguous();
    Tensor grad_x = unpermute.call(grad, saved[1], saved[2], optional(saved[3]), k, kept);
    Tensor grad_w;
    if (saved[3].defined() && ctx->needs_input_grad(3)) {
      grad_w = dots.call(saved[0], grad, saved[1], saved[2], k, kept);
    }
    return {grad_x, Tensor(), Tensor(), grad_w, Tensor(), Tensor()};
  }
};

class UnpermuteRows : public torch::autograd::Function<UnpermuteRows> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& y, const Tensor& order,
                        const Tensor& inverse, const OptTensor& weights, int64_t k,
                        int64_t kept) {
    static auto fwd = op<RowsOp>("moe_ops::unpermute_rows");
    return rows_forward(ctx, fwd, y, order, inverse, weights, k, kept);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto permute = op<RowsOp>("moe_ops::permute_rows");
    static auto both = op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                     const Tensor&, const Tensor&, int64_t,
                                                     int64_t)>("moe_ops::unpermute_rows_backward");
    auto saved = ctx->get_saved_variables();
    const int64_t k = ctx->saved_data["k"].toInt(), kept = ctx->saved_data["kept"].toInt();
    Tensor grad = grads[0].contiguous();
    if (saved[3].defined() && ctx->needs_input_grad(3)) {  // both gradients in one pass
      auto [grad_y, grad_w] = both.call(grad, saved[0], saved[1], saved[2], saved[3], k, kept);
      return {grad_y, Tensor(), Tensor(), grad_w, Tensor(), Tensor()};
    }
    Tensor grad_y = permute.call(grad, saved[1], saved[2], optional(saved[3]), k, kept)
                        .narrow(0, 0, saved[0].size(0));
    return {grad_y, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor permute_rows_autograd(const Tensor& x, const Tensor& order, const Tensor& inverse,
                             const OptTensor& weights, int64_t k, int64_t kept) {
  return PermuteRows::apply(x, order, inverse, weights, k, kept);
}

Tensor unpermute_rows_autograd(const Tensor& y, const Tensor& order, const Tensor& inverse,
                               const OptTensor& weights, int64_t k, int64_t kept) {
  return UnpermuteRows::apply(y, order, inverse, weights, k, kept);
}

// ---- the grouped product (group_gemm_cpu.cpp) ----------------------------------------------

// group_rows_mm / group_inner_mm(a, b, ends, spread, block)
using Product = Tensor(const Tensor&, const Tensor&, c10::IntArrayRef, bool, int64_t);
using Pair = std::tuple<Tensor, Tensor>;

// group_mm(a (N, K), b (G, K, M), ends, block) = group_rows_mm with the groups shared out among
// the threads; backward: grad_a = group_rows_mm(grad, b^T), grad_b = group_inner_mm(a, grad).
class GroupMm : public torch::autograd::Function<GroupMm> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& b,
                        c10::IntArrayRef ends, int64_t block) {
    static auto rows = op<Tensor(const Tensor&, const Tensor&, c10::IntArrayRef, bool, int64_t)>(
        "moe_ops::group_rows_mm");
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({a, b});
    ctx->saved_data["ends"] = ends.vec();
    ctx->saved_data["block"] = block;
    return rows.call(a, b, ends, true, block);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto rows = op<Product>("moe_ops::group_rows_mm");
    static auto inner = op<Product>("moe_ops::group_inner_mm");
    auto saved = ctx->get_saved_variables();
    auto ends = ctx->saved_data["ends"].toIntVector();
    const int64_t block = ctx->saved_data["block"].toInt();
    Tensor grad = grads[0].contiguous(), grad_a, grad_b;
    if (ctx->needs_input_grad(0)) {
      grad_a = rows.call(grad, saved[1].transpose(1, 2), ends, true, block);
    }
    if (ctx->needs_input_grad(1)) grad_b = inner.call(saved[0], grad, ends, true, block);
    return {grad_a, grad_b, Tensor(), Tensor()};
  }
};

Tensor group_mm_autograd(const Tensor& a, const Tensor& b, c10::IntArrayRef ends, int64_t block) {
  return GroupMm::apply(a, b, ends, block);
}

// Below autograd (no gradient wanted, or a traced graph): the forward product.
Tensor group_mm_plain(const Tensor& a, const Tensor& b, c10::IntArrayRef ends, int64_t block) {
  static auto rows = op<Tensor(const Tensor&, const Tensor&, c10::IntArrayRef, bool, int64_t)>(
      "moe_ops::group_rows_mm");
  return rows.call(a, b, ends, true, block);
}

// grouped_swiglu(x (N, D), w13 (G, D, 2H), w2 (G, H, D_out), ends, block) -> (N, D_out):
// rows of group g = (silu(x w1[g]) * x w3[g]) w2[g] with w13[g] = [w1[g] | w3[g]], the expert
// (or modality) FFN as one node: the piece-by-piece kernels of csrc/swiglu_ffn_cpu.cpp, whose
// products run exact rows (block 1: float32 / float64) or whole blocks of rows (half
// precision; block 0 = by dtype). The forward saves gate_up (the gate and up products side by
// side), not h: the backward recomputes h in the pass that takes the gate's gradient.
using FfnForward = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                              c10::IntArrayRef, int64_t);
auto& fused_forward() {
  static auto forward = op<FfnForward>("moe_ops::grouped_swiglu_forward");
  return forward;
}

class GroupedSwiglu : public torch::autograd::Function<GroupedSwiglu> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w13, const Tensor& w2,
                        c10::IntArrayRef ends, int64_t block) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, gate_up] = fused_forward().call(x, w13, w2, ends, block);
    ctx->save_for_backward({x, w13, w2, gate_up});
    ctx->saved_data["ends"] = ends.vec();
    ctx->saved_data["block"] = block;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto fused = op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        c10::IntArrayRef, c10::IntArrayRef, int64_t)>("moe_ops::grouped_swiglu_backward");
    auto s = ctx->get_saved_variables();
    std::vector<int64_t> needs;
    for (int i = 0; i < 3; ++i) needs.push_back(ctx->needs_input_grad(i) ? 1 : 0);
    auto [gx, g13, g2] = fused.call(grads[0].contiguous(), s[0], s[1], s[2], s[3],
                                    ctx->saved_data["ends"].toIntVector(), needs,
                                    ctx->saved_data["block"].toInt());
    auto kept = [&](Tensor t, int i) { return ctx->needs_input_grad(i) ? t : Tensor(); };
    return {kept(gx, 0), kept(g13, 1), kept(g2, 2), Tensor(), Tensor()};
  }
};

Tensor grouped_swiglu_autograd(const Tensor& x, const Tensor& w13, const Tensor& w2,
                               c10::IntArrayRef ends, int64_t block) {
  return GroupedSwiglu::apply(x, w13, w2, ends, block);
}

Tensor grouped_swiglu_plain(const Tensor& x, const Tensor& w13, const Tensor& w2,
                            c10::IntArrayRef ends, int64_t block) {
  return std::get<0>(fused_forward().call(x, w13, w2, ends, block));
}

// routed_swiglu(x (N, D), w13, w2, order, inverse, weights (S,), ends, k, block) -> (N, D_out):
// an MoE's experts with the dispatch's gather and combine in the same kernels
// (csrc/swiglu_ffn_cpu.cpp): permute_rows, grouped_swiglu and the weighted unpermute_rows as one
// node, whose backward gathers the output gradient piece by piece and takes the combine
// weights' gradient from h (recomputed there) instead of from saved expert outputs. Neither
// the permuted rows nor the expert outputs are kept for the backward.
auto& routed_forward() {
  static auto forward = op<std::tuple<Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
      c10::IntArrayRef, int64_t, int64_t)>("moe_ops::routed_swiglu_forward");
  return forward;
}

class RoutedSwiglu : public torch::autograd::Function<RoutedSwiglu> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w13, const Tensor& w2,
                        const Tensor& order, const Tensor& inverse, const Tensor& weights,
                        c10::IntArrayRef ends, int64_t k, int64_t block) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, gate_up] =
        routed_forward().call(x, w13, w2, order, inverse, weights, ends, k, block);
    ctx->save_for_backward({x, w13, w2, gate_up, order, inverse, weights});
    ctx->saved_data["ends"] = ends.vec();
    ctx->saved_data["k"] = k;
    ctx->saved_data["block"] = block;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto fused = op<std::tuple<Tensor, Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        const Tensor&, const Tensor&, c10::IntArrayRef, int64_t, c10::IntArrayRef, int64_t)>(
        "moe_ops::routed_swiglu_backward");
    auto s = ctx->get_saved_variables();
    // inputs 0-2 and 5: x, w13, w2, weights; the kernel's flags: x, weights, w13, w2
    const std::vector<int64_t> needs = {ctx->needs_input_grad(0), ctx->needs_input_grad(5),
                                        ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    auto [gx, gw, g13, g2] =
        fused.call(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], s[5], s[6],
                   ctx->saved_data["ends"].toIntVector(), ctx->saved_data["k"].toInt(), needs,
                   ctx->saved_data["block"].toInt());
    auto kept = [&](Tensor t, int i) { return ctx->needs_input_grad(i) ? t : Tensor(); };
    return {kept(gx, 0), kept(g13, 1), kept(g2, 2), Tensor(),  Tensor(),
            kept(gw, 5), Tensor(),      Tensor(),     Tensor()};
  }
};

Tensor routed_swiglu_autograd(const Tensor& x, const Tensor& w13, const Tensor& w2,
                              const Tensor& order, const Tensor& inverse, const Tensor& weights,
                              c10::IntArrayRef ends, int64_t k, int64_t block) {
  return RoutedSwiglu::apply(x, w13, w2, order, inverse, weights, ends, k, block);
}

Tensor routed_swiglu_plain(const Tensor& x, const Tensor& w13, const Tensor& w2,
                           const Tensor& order, const Tensor& inverse, const Tensor& weights,
                           c10::IntArrayRef ends, int64_t k, int64_t block) {
  return std::get<0>(
      routed_forward().call(x, w13, w2, order, inverse, weights, ends, k, block));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_ops, m) {
  m.def("group_mm(Tensor a, Tensor b, int[] ends, int block) -> Tensor");
  m.def("grouped_swiglu(Tensor x, Tensor w13, Tensor w2, int[] ends, int block) -> Tensor");
  m.def("routed_swiglu(Tensor x, Tensor w13, Tensor w2, Tensor order, Tensor inverse, "
        "Tensor weights, int[] ends, int k, int block=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_ops, CompositeExplicitAutograd, m) {
  m.impl("group_mm", &group_mm_plain);
  m.impl("grouped_swiglu", &grouped_swiglu_plain);
  m.impl("routed_swiglu", &routed_swiglu_plain);
}

TORCH_LIBRARY_IMPL(moe_ops, Autograd, m) {
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("swiglu", &swiglu_autograd);
  m.impl("rotary", &rotary_autograd);
  m.impl("qkv_heads", &qkv_heads_autograd);
  m.impl("router_topk", &router_topk_autograd);
  m.impl("permute_rows", &permute_rows_autograd);
  m.impl("unpermute_rows", &unpermute_rows_autograd);
  m.impl("group_mm", &group_mm_autograd);
  m.impl("grouped_swiglu", &grouped_swiglu_autograd);
  m.impl("routed_swiglu", &routed_swiglu_autograd);
}

}  // namespace moe_ops
