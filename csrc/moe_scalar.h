// Scalar loads and stores of the fused CPU kernels (fused_cpu.cpp, qkv_cpu.cpp): every dtype
// read into and written from its accumulation type (float32 for half precision, float64 for
// double), bfloat16 by the bit operations of moe_rows_cpu.h, which vectorise; and a row's
// inverse RMS.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "moe_rows_cpu.h"

#define FUSED_INLINE inline __attribute__((always_inline))

namespace moe_ops {

template <typename T>
using acc_of = at::opmath_type<T>;

template <typename T>
FUSED_INLINE acc_of<T> load(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return rows::from_bf16(reinterpret_cast<const uint16_t*>(p)[i]);
  } else {
    return static_cast<acc_of<T>>(p[i]);
  }
}

template <typename T, typename A>
FUSED_INLINE void store(T* p, int64_t i, A v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    reinterpret_cast<uint16_t*>(p)[i] = rows::to_bf16(static_cast<float>(v));
  } else {
    p[i] = static_cast<T>(v);
  }
}

// v rounded to T and read back: what storing a value as T and loading it again gives.
template <typename T, typename A>
FUSED_INLINE A round_as(A v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return rows::from_bf16(rows::to_bf16(static_cast<float>(v)));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return static_cast<A>(static_cast<float>(c10::Half(static_cast<float>(v))));
  } else {
    return static_cast<A>(static_cast<T>(v));
  }
}

// 1 / sqrt(mean(x^2) + eps) over one row of D values, summed in the accumulation type.
template <typename T>
FUSED_INLINE acc_of<T> inv_rms(const T* x, int64_t D, double eps) {
  using A = acc_of<T>;
  A ss = A(0);
#pragma omp simd reduction(+ : ss)
  for (int64_t d = 0; d < D; ++d) {
    const A v = load(x, d);
    ss += v * v;
  }
  return A(1) / std::sqrt(ss / A(D) + static_cast<A>(eps));
}

}  // namespace moe_ops
