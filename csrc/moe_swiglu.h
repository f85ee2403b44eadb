// The SwiGLU gate silu(a) * b and its gradient, element by element, in the accumulation type:
// the loops of the fused swiglu op (fused_cpu.cpp) and of the fused grouped SwiGLU FFN
// (swiglu_ffn_cpu.cpp), with the routed FFN's weighted variant.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "moe_scalar.h"

namespace moe_ops {

template <typename A>
FUSED_INLINE A sigmoid(A v) {
  if constexpr (std::is_same_v<A, float>) {
    return 1.f / (1.f + rows::exp_f32(-v));
  } else {
    return A(1) / (A(1) + std::exp(-v));
  }
}

// h = silu(a) * b over elements [i0, i1).
template <typename T>
FUSED_INLINE void swiglu_forward_range(const T* a, const T* b, T* h, int64_t i0, int64_t i1) {
  using A = acc_of<T>;
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const A av = load(a, i);
    store(h, i, av * sigmoid(av) * load(b, i));
  }
}

// grad_a, grad_b of h = silu(a) * b from h's gradient g over elements [i0, i1); with `WithH`
// also h itself (the fused FFN's backward recomputes it for the down product's weight
// gradient). ga may be g itself: each element is read before it is written.
template <typename T, bool WithH = false>
FUSED_INLINE void swiglu_backward_range(const T* g, const T* a, const T* b, T* ga, T* gb,
                                        int64_t i0, int64_t i1, T* h = nullptr) {
  using A = acc_of<T>;
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const A av = load(a, i);
    const A bv = load(b, i);
    const A gv = load(g, i);
    const A s = sigmoid(av);
    const A silu = av * s;
    store(gb, i, gv * silu);
    store(ga, i, gv * bv * (s + silu * (A(1) - s)));
    if constexpr (WithH) store(h, i, silu * bv);
  }
}

// The routed FFN's backward over one row of n elements, whose output is combined with weight w:
// g holds grad_h before the weight (the output gradient's row times w2^T). Writes grad_a over g
// and grad_b for grad_h = w g, and hw = w h (the down product's input as its weight gradient
// needs it); returns <g, h>, the gradient of w (y = w h w2, so <grad_y, h w2> = <grad_y w2^T, h>).
template <typename T>
FUSED_INLINE acc_of<T> swiglu_backward_weighted(T* g, const T* a, const T* b, T* gb, T* hw,
                                                int64_t n, acc_of<T> w) {
  using A = acc_of<T>;
  A dot = A(0);
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < n; ++i) {
    const A av = load(a, i);
    const A bv = load(b, i);
    const A gv = load(g, i);
    const A s = sigmoid(av);
    const A silu = av * s;
    const A hv = silu * bv;
    dot += gv * hv;
    const A gw = gv * w;
    store(gb, i, gw * silu);
    store(g, i, gw * bv * (s + silu * (A(1) - s)));
    store(hw, i, hv * w);
  }
  return dot;
}

}  // namespace moe_ops
