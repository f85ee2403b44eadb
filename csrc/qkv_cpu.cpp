// The attention's inputs in one pass (CPU): split the fused q/k/v projection into heads,
// RMS-normalise q and k per head (QK-norm, one weight row per group), rotate them (rotary
// embeddings) and put every row into sequence order; and the backward of all of it, which writes
// the gradient of the projection in one buffer. Unfused, the forward is a split, two copies (the
// norms need contiguous rows), two norms, two rotations and, for rows grouped by modality, three
// gathers; the backward their backwards and a concatenation. Each pass reads and writes the
// whole tensor.
//
//   qkv_heads(qkv (R, (H + 2 KV) hd), src (P,)?, group (P,)?, q_weight (G, hd)?, k_weight?,
//             cos (B, T, hd), sin, H, KV, eps)  -> q (B, T, H, hd), k, v (B, T, KV, hd)
//   qkv_heads_backward(grad_q, grad_k, grad_v, qkv, src, group, q_weight, k_weight, cos, sin,
//             eps)  -> grad_qkv (R, (H + 2 KV) hd), grad_q_weight (G, hd), grad_k_weight
//                          (the weight gradients empty (0,) without weights)
//
// Position p = b T + t reads row src[p] of qkv (row p without src; src must be a permutation of
// the R = P rows) and normalises with weight row group[p] (row 0 without group). Without
// weights there is no norm. As in the unfused chain, the normalised values are rounded to qkv's
// dtype before the rotation, q and k come out in cos's dtype (qkv's, or float32 beside half
// precision), v in qkv's. The reference is moe.fused.qkv_heads_reference; autograd is in
// autograd.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "moe_checks.h"
#include "moe_scalar.h"

namespace moe_ops {
namespace {

constexpr int64_t kMaxHeadDim = 1024;

// One row's n_heads heads of hd values at x: normalised by w (none when null), rotated by the
// position's angles c, s (hd,), written to out (n_heads * hd values).
template <typename T, typename W, typename C>
FUSED_INLINE void heads_forward(const T* x, const W* w, const C* c, const C* s, C* out,
                                int64_t n_heads, int64_t hd, double eps) {
  using A = acc_of<T>;
  const int64_t half = hd / 2;
  A n[kMaxHeadDim];
  for (int64_t h = 0; h < n_heads; ++h) {
    const T* xr = x + h * hd;
    C* o = out + h * hd;
    if (w != nullptr) {
      const A inv = inv_rms(xr, hd, eps);
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) {
        n[d] = round_as<T>((load(xr, d) * inv) * static_cast<A>(load(w, d)));
      }
    } else {
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) n[d] = load(xr, d);
    }
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      store(o, i, n[i] * static_cast<A>(load(c, i)) - n[i + half] * static_cast<A>(load(s, i)));
      store(o, i + half, n[i + half] * static_cast<A>(load(c, i + half)) +
                             n[i] * static_cast<A>(load(s, i + half)));
    }
  }
}

// The backward of heads_forward for one row: grad g (head stride gh) -> gx (n_heads * hd
// values), and each head's share of the weight gradient added into gw (hd,).
template <typename T, typename W, typename C>
FUSED_INLINE void heads_backward(const C* g, int64_t gh, const T* x, const W* w, const C* c,
                                 const C* s, T* gx, acc_of<T>* gw, int64_t n_heads, int64_t hd,
                                 double eps) {
  using A = acc_of<T>;
  const int64_t half = hd / 2;
  A gn[kMaxHeadDim];
  for (int64_t h = 0; h < n_heads; ++h) {
    const C* gr = g + h * gh;
    const T* xr = x + h * hd;
    T* gxr = gx + h * hd;
    // the rotation's transpose, rounded to T as the unfused chain hands it to the norm
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const A g1 = load(gr, i), g2 = load(gr, i + half);
      gn[i] = round_as<T>(g1 * static_cast<A>(load(c, i)) +
                          g2 * static_cast<A>(load(s, i + half)));
      gn[i + half] = round_as<T>(g2 * static_cast<A>(load(c, i + half)) -
                                 g1 * static_cast<A>(load(s, i)));
    }
    if (w == nullptr) {
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) store(gxr, d, gn[d]);
      continue;
    }
    const A inv = inv_rms(xr, hd, eps);  // recomputed: cheaper than saving it
    A dot = A(0);
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < hd; ++d) {
      const A xv = load(xr, d);
      dot += gn[d] * static_cast<A>(load(w, d)) * xv;
      gw[d] += gn[d] * xv * inv;
    }
    dot *= inv / A(hd);
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) {
      store(gxr, d, inv * (gn[d] * static_cast<A>(load(w, d)) - load(xr, d) * inv * dot));
    }
  }
}

// Entry points: templates for every dtype triple, and clones compiled for AVX-512 / AVX2 /
// baseline (MOE_CLONES) for the triples training meets, which overload resolution prefers.
template <typename T, typename W, typename C>
void heads_fwd(const T* x, const W* w, const C* c, const C* s, C* out, int64_t n_heads,
               int64_t hd, double eps) {
  heads_forward<T, W, C>(x, w, c, s, out, n_heads, hd, eps);
}

template <typename T, typename W, typename C>
void heads_bwd(const C* g, int64_t gh, const T* x, const W* w, const C* c, const C* s, T* gx,
               acc_of<T>* gw, int64_t n_heads, int64_t hd, double eps) {
  heads_backward<T, W, C>(g, gh, x, w, c, s, gx, gw, n_heads, hd, eps);
}

using bf16 = c10::BFloat16;
using f32 = float;

#define QKV_CLONES(T, W, C)                                                                    \
  MOE_CLONES void heads_fwd(const T* x, const W* w, const C* c, const C* s, C* out,            \
                            int64_t n_heads, int64_t hd, double eps) {                         \
    heads_forward<T, W, C>(x, w, c, s, out, n_heads, hd, eps);                                 \
  }                                                                                            \
  MOE_CLONES void heads_bwd(const C* g, int64_t gh, const T* x, const W* w, const C* c,        \
                            const C* s, T* gx, float* gw, int64_t n_heads, int64_t hd,         \
                            double eps) {                                                      \
    heads_backward<T, W, C>(g, gh, x, w, c, s, gx, gw, n_heads, hd, eps);                      \
  }
QKV_CLONES(f32, f32, f32)
QKV_CLONES(bf16, bf16, bf16)
QKV_CLONES(bf16, f32, f32)
QKV_CLONES(bf16, f32, bf16)

// ---- argument checks ---------------------------------------------------------------------------

struct Layout {
  int64_t B, T, P, H, KV, hd, width, G;
};

Layout check_args(const at::Tensor& qkv, const std::optional<at::Tensor>& src,
                  const std::optional<at::Tensor>& group,
                  const std::optional<at::Tensor>& q_weight,
                  const std::optional<at::Tensor>& k_weight, const at::Tensor& cos,
                  const at::Tensor& sin, int64_t H, int64_t KV) {
  TORCH_CHECK(cos.dim() == 3 && cos.is_contiguous() && sin.sizes() == cos.sizes() &&
                  sin.is_contiguous() && sin.scalar_type() == cos.scalar_type(),
              "cos and sin must be contiguous (B, T, head_dim) tensors of one dtype");
  Layout l{cos.size(0), cos.size(1), cos.size(0) * cos.size(1), H, KV, cos.size(2), 0, 1};
  TORCH_CHECK(H > 0 && KV > 0 && H % KV == 0, "heads must be a positive multiple of kv_heads");
  TORCH_CHECK(l.hd % 2 == 0 && l.hd > 0 && l.hd <= kMaxHeadDim,
              "head_dim must be even and at most ", kMaxHeadDim, ", got ", l.hd);
  l.width = (H + 2 * KV) * l.hd;
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(0) == l.P &&
                  qkv.size(1) == l.width,
              "qkv must be a contiguous (", l.P, ", ", l.width, ") tensor, got ", qkv.sizes());
  const auto xt = qkv.scalar_type();
  TORCH_CHECK(cos.scalar_type() == xt || (cos.scalar_type() == at::kFloat && xt != at::kDouble),
              "cos must have qkv's dtype or float32");
  TORCH_CHECK(q_weight.has_value() == k_weight.has_value(),
              "q_weight and k_weight come together");
  if (q_weight.has_value()) {
    const auto& w = *q_weight;
    TORCH_CHECK(w.dim() == 2 && w.size(1) == l.hd && w.is_contiguous() &&
                    k_weight->sizes() == w.sizes() && k_weight->is_contiguous() &&
                    k_weight->scalar_type() == w.scalar_type(),
                "q_weight and k_weight must be contiguous (groups, ", l.hd, ") tensors");
    TORCH_CHECK(w.scalar_type() == xt || (w.scalar_type() == at::kFloat && xt != at::kDouble),
                "the norm weights must have qkv's dtype or float32");
    l.G = w.size(0);
  }
  if (src.has_value()) {
    check_index(*src, "src");
    TORCH_CHECK(src->numel() == l.P, "src must have one row per position (", l.P, ")");
    std::vector<char> seen(l.P, 0);
    const int64_t* sp = src->data_ptr<int64_t>();
    for (int64_t p = 0; p < l.P; ++p) {
      TORCH_CHECK(sp[p] >= 0 && sp[p] < l.P && !seen[sp[p]], "src must be a permutation of "
                  "the ", l.P, " rows");
      seen[sp[p]] = 1;
    }
  }
  if (group.has_value()) {
    check_index(*group, "group");
    TORCH_CHECK(group->numel() == l.P, "group must have one id per position (", l.P, ")");
    TORCH_CHECK(q_weight.has_value(), "group ids need norm weights");
    if (l.P) {
      const auto [lo, hi] = std::minmax_element(group->data_ptr<int64_t>(),
                                                group->data_ptr<int64_t>() + l.P);
      TORCH_CHECK(*lo >= 0 && *hi < l.G, "group ids must be in [0, ", l.G, ")");
    }
  } else {
    TORCH_CHECK(l.G == 1, "weights of ", l.G, " groups need group ids");
  }
  return l;
}

// Calls f(T, W, C tags) for qkv's dtype, the weights' (T or float32) and cos's (T or float32).
template <typename F>
void dispatch_triple(at::ScalarType xt, std::optional<at::ScalarType> wt, at::ScalarType ct,
                     F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xt, "qkv_heads", [&] {
    using T = scalar_t;
    const bool w_same = !wt.has_value() || *wt == xt, c_same = ct == xt;
    if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
      f(T{}, T{}, T{});
    } else {
      if (w_same && c_same) f(T{}, T{}, T{});
      else if (w_same) f(T{}, T{}, float{});
      else if (c_same) f(T{}, float{}, T{});
      else f(T{}, float{}, float{});
    }
  });
}

template <typename W>
const W* weight_ptr(const std::optional<at::Tensor>& w) {
  return w.has_value() ? w->data_ptr<W>() : nullptr;
}

// ---- drivers -----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_heads_cpu(
    const at::Tensor& qkv, const std::optional<at::Tensor>& src,
    const std::optional<at::Tensor>& group, const std::optional<at::Tensor>& q_weight,
    const std::optional<at::Tensor>& k_weight, const at::Tensor& cos, const at::Tensor& sin,
    int64_t heads, int64_t kv_heads, double eps) {
  const Layout l = check_args(qkv, src, group, q_weight, k_weight, cos, sin, heads, kv_heads);
  auto q = at::empty({l.B, l.T, l.H, l.hd}, cos.options());
  auto k = at::empty({l.B, l.T, l.KV, l.hd}, cos.options());
  auto v = at::empty({l.B, l.T, l.KV, l.hd}, qkv.options());
  const int64_t* sp = src.has_value() ? src->data_ptr<int64_t>() : nullptr;
  const int64_t* gp = group.has_value() ? group->data_ptr<int64_t>() : nullptr;
  std::optional<at::ScalarType> wt;
  if (q_weight.has_value()) wt = q_weight->scalar_type();
  dispatch_triple(qkv.scalar_type(), wt, cos.scalar_type(), [&](auto t, auto u, auto c) {
    using T = decltype(t);
    using W = decltype(u);
    using C = decltype(c);
    const T* xp = qkv.data_ptr<T>();
    const W* qw = weight_ptr<W>(q_weight);
    const W* kw = weight_ptr<W>(k_weight);
    const C* cp = cos.data_ptr<C>();
    const C* snp = sin.data_ptr<C>();
    C* qp = q.data_ptr<C>();
    C* kp = k.data_ptr<C>();
    T* vp = v.data_ptr<T>();
    const int64_t hd = l.hd, vw = l.KV * hd;
    at::parallel_for(0, l.P, 16, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const T* row = xp + (sp ? sp[p] : p) * l.width;
        const int64_t g = gp ? gp[p] : 0;
        const C* cr = cp + p * hd;
        const C* sr = snp + p * hd;
        heads_fwd(row, qw ? qw + g * hd : qw, cr, sr, qp + p * l.H * hd, l.H, hd, eps);
        heads_fwd(row + l.H * hd, kw ? kw + g * hd : kw, cr, sr, kp + p * vw, l.KV, hd, eps);
        std::copy(row + (l.H + l.KV) * hd, row + l.width, vp + p * vw);
      }
    });
  });
  return {q, k, v};
}

void check_grad(const at::Tensor& g, const Layout& l, int64_t heads, at::ScalarType dtype,
                const char* name) {
  TORCH_CHECK(g.dim() == 4 && g.size(0) == l.B && g.size(1) == l.T && g.size(2) == heads &&
                  g.size(3) == l.hd && (g.stride(3) == 1 || g.numel() == 0) &&
                  g.scalar_type() == dtype,
              name, " must be (", l.B, ", ", l.T, ", ", heads, ", ", l.hd, ") ", dtype,
              " with a contiguous last dimension");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_heads_backward_cpu(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v,
    const at::Tensor& qkv, const std::optional<at::Tensor>& src,
    const std::optional<at::Tensor>& group, const std::optional<at::Tensor>& q_weight,
    const std::optional<at::Tensor>& k_weight, const at::Tensor& cos, const at::Tensor& sin,
    double eps) {
  TORCH_CHECK(grad_q.dim() == 4 && grad_k.dim() == 4, "grad_q and grad_k must be 4-D");
  const Layout l = check_args(qkv, src, group, q_weight, k_weight, cos, sin, grad_q.size(2),
                              grad_k.size(2));
  check_grad(grad_q, l, l.H, cos.scalar_type(), "grad_q");
  check_grad(grad_k, l, l.KV, cos.scalar_type(), "grad_k");
  check_grad(grad_v, l, l.KV, qkv.scalar_type(), "grad_v");
  auto gx = at::empty_like(qkv);
  const auto acc = at::toOpMathType(qkv.scalar_type());
  // one weight-gradient partial (q and k) per chunk of positions, summed after: a fixed order
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(16, (l.P + 4 * threads - 1) / (4 * threads));
  const int64_t chunks = std::max<int64_t>(1, (l.P + chunk - 1) / chunk);
  const bool norm = q_weight.has_value();
  auto partial = at::zeros({norm ? chunks : 0, 2, l.G, l.hd}, qkv.options().dtype(acc));
  const int64_t* sp = src.has_value() ? src->data_ptr<int64_t>() : nullptr;
  const int64_t* gp = group.has_value() ? group->data_ptr<int64_t>() : nullptr;
  std::optional<at::ScalarType> wt;
  if (norm) wt = q_weight->scalar_type();
  dispatch_triple(qkv.scalar_type(), wt, cos.scalar_type(), [&](auto t, auto u, auto c) {
    using T = decltype(t);
    using W = decltype(u);
    using C = decltype(c);
    using A = acc_of<T>;
    const T* xp = qkv.data_ptr<T>();
    const W* qw = weight_ptr<W>(q_weight);
    const W* kw = weight_ptr<W>(k_weight);
    const C* cp = cos.data_ptr<C>();
    const C* snp = sin.data_ptr<C>();
    const C* gqp = grad_q.data_ptr<C>();
    const C* gkp = grad_k.data_ptr<C>();
    const T* gvp = grad_v.data_ptr<T>();
    T* gxp = gx.data_ptr<T>();
    A* pp = norm ? partial.data_ptr<A>() : nullptr;
    const int64_t hd = l.hd;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        A* gwq = norm ? pp + ch * 2 * l.G * hd : nullptr;
        A* gwk = norm ? gwq + l.G * hd : nullptr;
        for (int64_t p = ch * chunk; p < std::min(l.P, (ch + 1) * chunk); ++p) {
          const int64_t b = p / l.T, tt = p % l.T, r = sp ? sp[p] : p;
          const int64_t g = gp ? gp[p] : 0;
          const T* row = xp + r * l.width;
          T* grow = gxp + r * l.width;
          const C* cr = cp + p * hd;
          const C* sr = snp + p * hd;
          heads_bwd(gqp + b * grad_q.stride(0) + tt * grad_q.stride(1), grad_q.stride(2), row,
                    qw ? qw + g * hd : qw, cr, sr, grow, norm ? gwq + g * hd : gwq, l.H, hd,
                    eps);
          heads_bwd(gkp + b * grad_k.stride(0) + tt * grad_k.stride(1), grad_k.stride(2),
                    row + l.H * hd, kw ? kw + g * hd : kw, cr, sr, grow + l.H * hd,
                    norm ? gwk + g * hd : gwk, l.KV, hd, eps);
          const T* gv = gvp + b * grad_v.stride(0) + tt * grad_v.stride(1);
          T* out = grow + (l.H + l.KV) * hd;
          for (int64_t h = 0; h < l.KV; ++h) {
            std::copy(gv + h * grad_v.stride(2), gv + h * grad_v.stride(2) + hd, out + h * hd);
          }
        }
      }
    });
  });
  if (!norm) return {gx, qkv.new_empty({0}), qkv.new_empty({0})};  // no weights: no gradients
  auto gw = partial.sum(0).to(q_weight->scalar_type());  // (2, G, hd)
  return {gx, gw[0].clone(), gw[1].clone()};  // two tensors, not two views of one
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_ops, m) {
  m.def("qkv_heads(Tensor qkv, Tensor? src, Tensor? group, Tensor? q_weight, Tensor? k_weight, "
        "Tensor cos, Tensor sin, int heads, int kv_heads, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("qkv_heads_backward(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor qkv, Tensor? src, "
        "Tensor? group, Tensor? q_weight, Tensor? k_weight, Tensor cos, Tensor sin, float eps) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moe_ops, CPU, m) {
  m.impl("qkv_heads", &qkv_heads_cpu);
  m.impl("qkv_heads_backward", &qkv_heads_backward_cpu);
}

}  // namespace moe_ops
