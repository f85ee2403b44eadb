// Fused element-wise kernels of the transformer block (CPU): RMSNorm with one weight row per
// group of rows, the SwiGLU gate silu(a) * b, and rotary embeddings, each forward and backward
// in one pass over the rows. Unfused, each is a chain of 4-8 torch ops that each read and write
// the whole tensor; at the sizes of a small model those passes cost as much as the matmuls.
//
//   rms_norm(x (M, D), weight (G, D), group_rows [G], eps)  -> y (M, D), rstd (M,)
//   rms_norm_backward(grad, x, weight, rstd, group_rows)   -> grad_x, grad_weight (G, D)
//   swiglu(a, b)                                           -> silu(a) * b
//   swiglu_backward(grad, a, b)                            -> grad_a, grad_b
//   swiglu_halves(gate_up (M, 2H))                         -> silu(gate) * up (M, H)
//   swiglu_halves_backward(grad (M, H), gate_up)           -> grad_gate_up (M, 2H)
//   rotary(x (B, T, H, hd), cos (B, T, hd), sin, transpose) -> rotated x (B, T, H, hd)
//
// swiglu_halves takes the gate and up products side by side in one tensor, as one product with
// a [w1 | w3] weight gives them (the grouped FFN in half precision, csrc/autograd.cpp), and its
// backward writes their gradients side by side, ready for one product with that weight.
//
// Rows of group g are the group_rows[g] rows after those of groups < g. Sums run in float32
// (float64 for double); weights may be float32 under half-precision rows (autocast). The
// PyTorch references and fake kernels are in moe/fused.py, autograd in csrc/autograd.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "moe_rows_cpu.h"
#include "moe_scalar.h"
#include "moe_swiglu.h"

namespace moe_ops {
namespace {

// ---- RMSNorm ---------------------------------------------------------------------------------

// Rows [r0, r1) all use the weight row w (D,).
template <typename T, typename W>
FUSED_INLINE void rms_forward_rows(const T* x, const W* w, T* y, acc_of<T>* rstd, int64_t r0,
                                   int64_t r1, int64_t D, double eps) {
  using A = acc_of<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * D;
    T* yr = y + r * D;
    const A inv = inv_rms(xr, D, eps);
    rstd[r] = inv;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) store(yr, d, (load(xr, d) * inv) * static_cast<A>(load(w, d)));
  }
}

// grad_x of rows [r0, r1), and their share of grad_weight added into gw (D,).
template <typename T, typename W>
FUSED_INLINE void rms_backward_rows(const T* g, const T* x, const W* w, const acc_of<T>* rstd,
                                    T* gx, acc_of<T>* gw, int64_t r0, int64_t r1, int64_t D) {
  using A = acc_of<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const T* gr = g + r * D;
    const T* xr = x + r * D;
    T* gxr = gx + r * D;
    const A inv = rstd[r];
    A c = A(0);
#pragma omp simd reduction(+ : c)
    for (int64_t d = 0; d < D; ++d) {
      const A gv = load(gr, d);
      const A xv = load(xr, d);
      c += gv * static_cast<A>(load(w, d)) * xv;
      gw[d] += gv * xv * inv;
    }
    c *= inv / A(D);  // mean(gxhat * xhat) / rstd, folded: gx = inv * (g w - x inv * c * inv)
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const A xv = load(xr, d);
      store(gxr, d, inv * (load(gr, d) * static_cast<A>(load(w, d)) - xv * inv * c));
    }
  }
}

// ---- rotary ----------------------------------------------------------------------------------

// One (b, t) position: H heads of hd values at x (head stride xh), angles c, s (hd,).
//   forward:   out[i] = x[i] c[i] - x[i+h] s[i],   out[i+h] = x[i+h] c[i+h] + x[i] s[i+h]
//   transpose: out[i] = x[i] c[i] + x[i+h] s[i+h], out[i+h] = x[i+h] c[i+h] - x[i] s[i]
// (the transpose is the forward's backward with respect to x).
template <typename T, typename C>
FUSED_INLINE void rotary_position(const T* x, int64_t xh, const C* c, const C* s, C* out,
                                  int64_t H, int64_t hd, bool transpose) {
  using A = acc_of<C>;
  const int64_t half = hd / 2;
  for (int64_t head = 0; head < H; ++head) {
    const T* xr = x + head * xh;
    C* o = out + head * hd;
    if (!transpose) {
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const A x1 = load(xr, i), x2 = load(xr, i + half);
        store(o, i, x1 * load(c, i) - x2 * load(s, i));
        store(o, i + half, x2 * load(c, i + half) + x1 * load(s, i + half));
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const A x1 = load(xr, i), x2 = load(xr, i + half);
        store(o, i, x1 * load(c, i) + x2 * load(s, i + half));
        store(o, i + half, x2 * load(c, i + half) - x1 * load(s, i));
      }
    }
  }
}

// ---- entry points ----------------------------------------------------------------------------
//
// Each kernel's entry point is one name with two kinds of overloads: the templates below serve
// every dtype pair; float32 and bfloat16 also get non-template overloads compiled for AVX-512,
// AVX2 and baseline x86-64 (`MOE_CLONES`), which overload resolution prefers where they match.

template <typename T, typename W>
void rms_fwd(const T* x, const W* w, T* y, acc_of<T>* rstd, int64_t r0, int64_t r1, int64_t D,
             double eps) {
  rms_forward_rows<T, W>(x, w, y, rstd, r0, r1, D, eps);
}

template <typename T, typename W>
void rms_bwd(const T* g, const T* x, const W* w, const acc_of<T>* rstd, T* gx, acc_of<T>* gw,
             int64_t r0, int64_t r1, int64_t D) {
  rms_backward_rows<T, W>(g, x, w, rstd, gx, gw, r0, r1, D);
}

template <typename T>
void swiglu_fwd(const T* a, const T* b, T* h, int64_t i0, int64_t i1) {
  swiglu_forward_range<T>(a, b, h, i0, i1);
}

template <typename T>
void swiglu_bwd(const T* g, const T* a, const T* b, T* ga, T* gb, int64_t i0, int64_t i1) {
  swiglu_backward_range<T>(g, a, b, ga, gb, i0, i1);
}

template <typename T, typename C>
void rotary_pos(const T* x, int64_t xh, const C* c, const C* s, C* out, int64_t H, int64_t hd,
                bool transpose) {
  rotary_position<T, C>(x, xh, c, s, out, H, hd, transpose);
}

using bf16 = c10::BFloat16;
using f32 = float;

#define FUSED_CLONE_RMS(T, W)                                                                  \
  MOE_CLONES void rms_fwd(const T* x, const W* w, T* y, float* rstd, int64_t r0, int64_t r1,   \
                          int64_t D, double eps) {                                             \
    rms_forward_rows<T, W>(x, w, y, rstd, r0, r1, D, eps);                                     \
  }                                                                                            \
  MOE_CLONES void rms_bwd(const T* g, const T* x, const W* w, const float* rstd, T* gx,         \
                          float* gw, int64_t r0, int64_t r1, int64_t D) {                      \
    rms_backward_rows<T, W>(g, x, w, rstd, gx, gw, r0, r1, D);                                 \
  }
FUSED_CLONE_RMS(f32, f32)
FUSED_CLONE_RMS(bf16, bf16)
FUSED_CLONE_RMS(bf16, f32)

#define FUSED_CLONE_SWIGLU(T)                                                                  \
  MOE_CLONES void swiglu_fwd(const T* a, const T* b, T* h, int64_t i0, int64_t i1) {           \
    swiglu_forward_range<T>(a, b, h, i0, i1);                                                  \
  }                                                                                            \
  MOE_CLONES void swiglu_bwd(const T* g, const T* a, const T* b, T* ga, T* gb, int64_t i0,     \
                             int64_t i1) {                                                     \
    swiglu_backward_range<T>(g, a, b, ga, gb, i0, i1);                                         \
  }
FUSED_CLONE_SWIGLU(f32)
FUSED_CLONE_SWIGLU(bf16)

#define FUSED_CLONE_ROTARY(T, C)                                                               \
  MOE_CLONES void rotary_pos(const T* x, int64_t xh, const C* c, const C* s, C* out, int64_t H, \
                             int64_t hd, bool transpose) {                                     \
    rotary_position<T, C>(x, xh, c, s, out, H, hd, transpose);                                 \
  }
FUSED_CLONE_ROTARY(f32, f32)
FUSED_CLONE_ROTARY(bf16, bf16)
FUSED_CLONE_ROTARY(bf16, f32)

// ---- drivers ---------------------------------------------------------------------------------

// Group boundaries from the per-group row counts; checks they cover the M rows.
std::vector<int64_t> group_ends(at::IntArrayRef group_rows, int64_t G, int64_t M) {
  TORCH_CHECK(static_cast<int64_t>(group_rows.size()) == G, "group_rows must have one entry per "
              "weight row (", G, "), got ", group_rows.size());
  std::vector<int64_t> ends(G);
  int64_t total = 0;
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(group_rows[g] >= 0, "group_rows must be non-negative");
    total += group_rows[g];
    ends[g] = total;
  }
  TORCH_CHECK(total == M, "group_rows must sum to the number of rows (", M, "), got ", total);
  return ends;
}

void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x.size(1),
              "weight must be a contiguous (groups, ", x.size(1), ") tensor");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
              "weight must have x's dtype or float32");
}

// Calls f(T tag, W tag) for the supported (row, weight) dtype pairs.
template <typename F>
void dispatch_pair(at::ScalarType xt, at::ScalarType wt, const char* name, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xt, "moe_ops fused", [&] {
    using T = scalar_t;
    if (wt == xt) {
      f(T{}, T{});
    } else {
      if constexpr (!std::is_same_v<T, double>) {
        f(T{}, float{});
      } else {
        TORCH_CHECK(false, name, ": float64 rows need float64 weights");
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                at::IntArrayRef group_rows, double eps) {
  check_norm_args(x, weight);
  const int64_t M = x.size(0), D = x.size(1), G = weight.size(0);
  const auto ends = group_ends(group_rows, G, M);
  auto y = at::empty_like(x);
  auto rstd = at::empty({M}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  dispatch_pair(x.scalar_type(), weight.scalar_type(), "rms_norm", [&](auto t, auto u) {
    using T = decltype(t);
    using W = decltype(u);
    const T* xp = x.data_ptr<T>();
    const W* wp = weight.data_ptr<W>();
    T* yp = y.data_ptr<T>();
    auto* rp = rstd.data_ptr<acc_of<T>>();
    at::parallel_for(0, M, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t g = 0, start = 0; g < G && start < r1; start = ends[g], ++g) {
        const int64_t lo = std::max(r0, start), hi = std::min(r1, ends[g]);
        if (lo < hi) rms_fwd(xp, wp + g * D, yp, rp, lo, hi, D, eps);
      }
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad,
                                                         const at::Tensor& x,
                                                         const at::Tensor& weight,
                                                         const at::Tensor& rstd,
                                                         at::IntArrayRef group_rows) {
  check_norm_args(x, weight);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.is_contiguous() &&
                  grad.scalar_type() == x.scalar_type(),
              "grad must be contiguous, shaped and typed like x");
  const int64_t M = x.size(0), D = x.size(1), G = weight.size(0);
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == M && rstd.is_contiguous() &&
                  rstd.scalar_type() == at::toOpMathType(x.scalar_type()),
              "rstd must be the forward's (", M, ",) statistics");
  const auto ends = group_ends(group_rows, G, M);
  auto gx = at::empty_like(x);
  const auto acc = at::toOpMathType(x.scalar_type());
  // one grad_weight partial per chunk of rows, summed after: no atomics, a fixed order
  const int64_t chunk = std::max<int64_t>(64, (M + 4 * at::get_num_threads() - 1) /
                                                  (4 * at::get_num_threads()));
  const int64_t chunks = std::max<int64_t>(1, (M + chunk - 1) / chunk);
  auto partial = at::zeros({chunks, G, D}, x.options().dtype(acc));
  dispatch_pair(x.scalar_type(), weight.scalar_type(), "rms_norm_backward", [&](auto t, auto u) {
    using T = decltype(t);
    using W = decltype(u);
    using A = acc_of<T>;
    const T* gp = grad.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    const W* wp = weight.data_ptr<W>();
    const A* rp = rstd.data_ptr<A>();
    T* gxp = gx.data_ptr<T>();
    A* pp = partial.data_ptr<A>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * chunk, r1 = std::min(M, r0 + chunk);
        for (int64_t g = 0, start = 0; g < G && start < r1; start = ends[g], ++g) {
          const int64_t lo = std::max(r0, start), hi = std::min(r1, ends[g]);
          if (lo < hi) rms_bwd(gp, xp, wp + g * D, rp, gxp, pp + (c * G + g) * D, lo, hi, D);
        }
      }
    });
  });
  return {gx, partial.sum(0).to(weight.scalar_type())};
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && a.is_contiguous() &&
                  b.is_contiguous(),
              name, ": inputs must be contiguous, of one shape and dtype");
}

at::Tensor swiglu_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_same(a, b, "swiglu");
  auto h = at::empty_like(a);
  const int64_t n = a.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "swiglu", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
      swiglu_fwd(ap, bp, hp, i0, i1);
    });
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad,
                                                       const at::Tensor& a,
                                                       const at::Tensor& b) {
  check_same(a, b, "swiglu_backward");
  check_same(grad, a, "swiglu_backward");
  auto ga = at::empty_like(a);
  auto gb = at::empty_like(b);
  const int64_t n = a.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "swiglu_backward",
                                  [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    scalar_t* gap = ga.data_ptr<scalar_t>();
    scalar_t* gbp = gb.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
      swiglu_bwd(gp, ap, bp, gap, gbp, i0, i1);
    });
  });
  return {ga, gb};
}

// Rows per task of the halves kernels: about 16K elements, as the element-wise kernels take.
int64_t halves_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)); }

void check_halves(const at::Tensor& gate_up, const char* name) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.is_contiguous(), name,
              ": gate_up must be a contiguous (M, 2H) tensor");
}

at::Tensor swiglu_halves_cpu(const at::Tensor& gate_up) {
  check_halves(gate_up, "swiglu_halves");
  const int64_t M = gate_up.size(0), H = gate_up.size(1) / 2;
  auto h = at::empty({M, H}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate_up.scalar_type(),
                                  "swiglu_halves", [&] {
    const scalar_t* gu = gate_up.data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    at::parallel_for(0, M, halves_grain(H),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        swiglu_fwd(gu + r * 2 * H, gu + r * 2 * H + H, hp + r * H, 0, H);
      }
    });
  });
  return h;
}

at::Tensor swiglu_halves_backward_cpu(const at::Tensor& grad, const at::Tensor& gate_up) {
  check_halves(gate_up, "swiglu_halves_backward");
  const int64_t M = gate_up.size(0), H = gate_up.size(1) / 2;
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == M && grad.size(1) == H && grad.is_contiguous() &&
                  grad.scalar_type() == gate_up.scalar_type(),
              "swiglu_halves_backward: grad must be a contiguous (", M, ", ", H,
              ") tensor of gate_up's dtype");
  auto out = at::empty_like(gate_up);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate_up.scalar_type(),
                                  "swiglu_halves_backward", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* gu = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, halves_grain(H),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = r * 2 * H;
        swiglu_bwd(gp + r * H, gu + o, gu + o + H, op + o, op + o + H, 0, H);
      }
    });
  });
  return out;
}

at::Tensor rotary_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      bool transpose) {
  TORCH_CHECK(x.dim() == 4 && (x.stride(3) == 1 || x.numel() == 0) && x.size(3) % 2 == 0,
              "x must be (B, T, H, head_dim) with an even, contiguous last dimension");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), hd = x.size(3);
  TORCH_CHECK(cos.dim() == 3 && cos.size(0) == B && cos.size(1) == T && cos.size(2) == hd &&
                  cos.is_contiguous() && sin.sizes() == cos.sizes() && sin.is_contiguous() &&
                  sin.scalar_type() == cos.scalar_type(),
              "cos and sin must be contiguous (", B, ", ", T, ", ", hd, ") tensors of one dtype");
  TORCH_CHECK(x.scalar_type() == cos.scalar_type() || cos.scalar_type() == at::kFloat,
              "cos must have x's dtype or float32");
  auto out = at::empty({B, T, H, hd}, x.options().dtype(cos.scalar_type()));
  const int64_t sb = x.stride(0), st = x.stride(1), sh = x.stride(2);
  dispatch_pair(x.scalar_type(), cos.scalar_type(), "rotary", [&](auto t, auto u) {
    using X = decltype(t);
    using C = decltype(u);
    const X* xp = x.data_ptr<X>();
    const C* cp = cos.data_ptr<C>();
    const C* sp = sin.data_ptr<C>();
    C* op = out.data_ptr<C>();
    at::parallel_for(0, B * T, 16, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p / T, tt = p % T;
        rotary_pos(xp + b * sb + tt * st, sh, cp + p * hd, sp + p * hd, op + p * H * hd, H,
                         hd, transpose);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_ops, m) {
  m.def("rms_norm(Tensor x, Tensor weight, int[] group_rows, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd, int[] group_rows)"
        " -> (Tensor, Tensor)");
  m.def("swiglu(Tensor a, Tensor b) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor a, Tensor b) -> (Tensor, Tensor)");
  m.def("swiglu_halves(Tensor gate_up) -> Tensor");
  m.def("swiglu_halves_backward(Tensor grad, Tensor gate_up) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, bool transpose) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_ops, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
  m.impl("swiglu_halves", &swiglu_halves_cpu);
  m.impl("swiglu_halves_backward", &swiglu_halves_backward_cpu);
  m.impl("rotary", &rotary_cpu);
}

}  // namespace moe_ops
