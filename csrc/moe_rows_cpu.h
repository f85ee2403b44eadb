// Row loops of the CPU kernels (moe_ops.cpp): scale, accumulate, store and dot one row of D
// values (and scale_dot: a scaled copy and a dot product in one read; combine2: two scaled rows
// summed in one pass), accumulating in float32 (float64 for double); `exp_f32`, an exp that
// vectorises (fused_cpu.cpp, router_cpu.cpp); and `prefetch_row` for loops that gather rows
// (also swiglu_ffn_cpu.cpp).
//
// float32 and bfloat16 get their own loops, compiled for AVX-512, AVX2 and baseline x86-64
// (GCC picks one when the library loads: `target_clones`), with bfloat16 converted by bit
// operations that vectorise (round to nearest even, NaN kept: the same bits as c10::BFloat16).
// The dot products use `omp simd` reductions, which reorder the sum. Other types take the
// generic loops.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

// The clones are chosen by CPU features: x86-64-v4 (AVX-512) and v3 (AVX2, FMA), GCC 12 and
// newer. (A CPU-model clone such as arch=skylake-avx512 is chosen only on that very model.)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define MOE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOE_CLONES
#endif

namespace moe_ops {
namespace rows {

// always_inline with builtins: the clones below may only inline what is marked so.
inline __attribute__((always_inline)) float from_bf16(uint16_t v) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16);
}

inline __attribute__((always_inline)) uint16_t to_bf16(float f) {
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
}

// exp(x) in float32 that vectorises (std::exp does not without -ffast-math): x = n ln2 + r with
// |r| <= ln2 / 2, exp(r) by the Cephes expf polynomial (about 1 ulp), times 2^n built from bits.
// The input is clamped to [-87, 88], which keeps 2^n a normal float; silu and sigmoid only need
// exp(-a) there to saturate.
inline __attribute__((always_inline)) float exp_f32(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  constexpr float round = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + round) - round;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

// Asks for the first cache lines of a row that a loop reads kAhead rows later (at most 1 KB: the
// hardware's stream prefetcher follows on from there, and more requests than the core can keep
// in flight are dropped). The routed FFN's gathers, the permute and the unpermute read rows in
// the routing's order, which the hardware cannot guess: without this each row waits for memory
// when it is reached. Measured on one thread at bench moe's layer (bfloat16, rows of 1 KB): the
// routed FFN's three gathers per step 6.1 -> 4.6 ms, unpermute_rows from memory 0.66 -> 0.53 ms
// (float32 1.83 -> 1.58). The permute, timed alone on rows still in cache, was no faster with it
// (0.94-1.07), but in bench ops' sequence of passes, whose rows come from memory, paired in one
// process: the permute 0.90-0.97 of its time, the weighted unpermute's backward (the same loop)
// 0.78-0.98, the four passes 0.89-0.93 in bfloat16 and 0.93-0.96 in float32.
constexpr int64_t kAhead = 4;
constexpr int64_t kPrefetchBytes = 1024;

inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  const int64_t end = bytes < kPrefetchBytes ? bytes : kPrefetchBytes;
  for (int64_t o = 0; o < end; o += 64) __builtin_prefetch(p + o, 0, 3);
}

// ---- generic: any scalar type, accumulating in acc_t ---------------------------------------

template <typename scalar_t, typename acc_t>
inline void scale(const scalar_t* src, acc_t s, scalar_t* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(static_cast<acc_t>(src[d]) * s);
}

// acc = src * s (first) or acc += src * s
template <typename scalar_t, typename acc_t>
inline void accumulate(acc_t* acc, const scalar_t* src, acc_t s, int64_t D, bool first) {
  if (first) {
    for (int64_t d = 0; d < D; ++d) acc[d] = static_cast<acc_t>(src[d]) * s;
  } else {
    for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(src[d]) * s;
  }
}

// dst = a * sa + b * sb: two rows combined in one pass (a token's k = 2 expert rows)
template <typename scalar_t, typename acc_t>
inline void combine2(const scalar_t* a, acc_t sa, const scalar_t* b, acc_t sb, scalar_t* dst,
                     int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    dst[d] = static_cast<scalar_t>(static_cast<acc_t>(a[d]) * sa + static_cast<acc_t>(b[d]) * sb);
  }
}

template <typename scalar_t, typename acc_t>
inline void store(const acc_t* acc, scalar_t* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
}

template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* a, const scalar_t* b, int64_t D) {
  acc_t acc = acc_t(0);
  for (int64_t d = 0; d < D; ++d) acc += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  return acc;
}

// dst = src * s, and the dot product of src with other (one read of src for both)
template <typename scalar_t, typename acc_t>
inline acc_t scale_dot(const scalar_t* src, acc_t s, scalar_t* dst, const scalar_t* other,
                       int64_t D) {
  acc_t acc = acc_t(0);
  for (int64_t d = 0; d < D; ++d) {
    const acc_t v = static_cast<acc_t>(src[d]);
    dst[d] = static_cast<scalar_t>(v * s);
    acc += v * static_cast<acc_t>(other[d]);
  }
  return acc;
}

// ---- float32 -------------------------------------------------------------------------------

MOE_CLONES static void scale_f32(const float* src, float s, float* dst, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * s;
}

MOE_CLONES static void accumulate_f32(float* acc, const float* src, float s, int64_t D,
                                      bool first) {
  if (first) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] = src[d] * s;
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += src[d] * s;
  }
}

MOE_CLONES static void combine2_f32(const float* a, float sa, const float* b, float sb,
                                    float* dst, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) dst[d] = a[d] * sa + b[d] * sb;
}

MOE_CLONES static float dot_f32(const float* a, const float* b, int64_t D) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) acc += a[d] * b[d];
  return acc;
}

MOE_CLONES static float scale_dot_f32(const float* src, float s, float* dst, const float* other,
                                      int64_t D) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) {
    dst[d] = src[d] * s;
    acc += src[d] * other[d];
  }
  return acc;
}

template <>
inline void scale<float, float>(const float* src, float s, float* dst, int64_t D) {
  scale_f32(src, s, dst, D);
}
template <>
inline float scale_dot<float, float>(const float* src, float s, float* dst, const float* other,
                                     int64_t D) {
  return scale_dot_f32(src, s, dst, other, D);
}
template <>
inline void accumulate<float, float>(float* acc, const float* src, float s, int64_t D,
                                     bool first) {
  accumulate_f32(acc, src, s, D, first);
}
template <>
inline void combine2<float, float>(const float* a, float sa, const float* b, float sb, float* dst,
                                   int64_t D) {
  combine2_f32(a, sa, b, sb, dst, D);
}
template <>
inline float dot<float, float>(const float* a, const float* b, int64_t D) {
  return dot_f32(a, b, D);
}

// ---- bfloat16 (as its uint16 bits) ----------------------------------------------------------

MOE_CLONES static void scale_bf16(const uint16_t* src, float s, uint16_t* dst, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) dst[d] = to_bf16(from_bf16(src[d]) * s);
}

MOE_CLONES static void accumulate_bf16(float* acc, const uint16_t* src, float s, int64_t D,
                                       bool first) {
  if (first) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] = from_bf16(src[d]) * s;
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += from_bf16(src[d]) * s;
  }
}

MOE_CLONES static void store_bf16(const float* acc, uint16_t* dst, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) dst[d] = to_bf16(acc[d]);
}

MOE_CLONES static void combine2_bf16(const uint16_t* a, float sa, const uint16_t* b, float sb,
                                     uint16_t* dst, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) dst[d] = to_bf16(from_bf16(a[d]) * sa + from_bf16(b[d]) * sb);
}

MOE_CLONES static float dot_bf16(const uint16_t* a, const uint16_t* b, int64_t D) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) acc += from_bf16(a[d]) * from_bf16(b[d]);
  return acc;
}

MOE_CLONES static float scale_dot_bf16(const uint16_t* src, float s, uint16_t* dst,
                                       const uint16_t* other, int64_t D) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) {
    const float v = from_bf16(src[d]);
    dst[d] = to_bf16(v * s);
    acc += v * from_bf16(other[d]);
  }
  return acc;
}

using bf16 = c10::BFloat16;
inline const uint16_t* bits(const bf16* p) { return reinterpret_cast<const uint16_t*>(p); }
inline uint16_t* bits(bf16* p) { return reinterpret_cast<uint16_t*>(p); }

template <>
inline void scale<bf16, float>(const bf16* src, float s, bf16* dst, int64_t D) {
  scale_bf16(bits(src), s, bits(dst), D);
}
template <>
inline void accumulate<bf16, float>(float* acc, const bf16* src, float s, int64_t D, bool first) {
  accumulate_bf16(acc, bits(src), s, D, first);
}
template <>
inline void store<bf16, float>(const float* acc, bf16* dst, int64_t D) {
  store_bf16(acc, bits(dst), D);
}
template <>
inline void combine2<bf16, float>(const bf16* a, float sa, const bf16* b, float sb, bf16* dst,
                                  int64_t D) {
  combine2_bf16(bits(a), sa, bits(b), sb, bits(dst), D);
}
template <>
inline float dot<bf16, float>(const bf16* a, const bf16* b, int64_t D) {
  return dot_bf16(bits(a), bits(b), D);
}
template <>
inline float scale_dot<bf16, float>(const bf16* src, float s, bf16* dst, const bf16* other,
                                    int64_t D) {
  return scale_dot_bf16(bits(src), s, bits(dst), bits(other), D);
}

}  // namespace rows
}  // namespace moe_ops
