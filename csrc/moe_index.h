// Index arithmetic of the grouping primitive, shared by the CPU loops (moe_ops.cpp) and the
// CUDA kernels (moe_ops_cuda.cu), so the logic a GPU-less CI cannot run on a GPU is still
// exercised by the CPU tests.
//
// Vocabulary. N tokens each choose k groups: S = N * k slots, slot s = t * k + j.
// `order` (S,) lists slots grouped by group (stable in priority order); its first `kept` rows
// are computed, the rest were dropped by capacity. `inverse` (S,) is the row of each slot.
// A padded layout (every group given the same number of rows) has more rows than slots: its
// order holds -1 for the padding rows, which read as zeros like dropped rows.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define MOE_HD __host__ __device__
#else
#define MOE_HD
#endif

namespace moe_ops {

MOE_HD inline int64_t token_of_slot(int64_t slot, int64_t k) { return slot / k; }

MOE_HD inline bool within_capacity(int64_t rank, int64_t capacity) {
  return capacity < 0 || rank < capacity;
}

// Row of a slot after sorting: kept slots at their group's start plus their rank, dropped
// slots after every kept one, in slot order.
MOE_HD inline int64_t destination_row(bool kept, int64_t group_start, int64_t rank,
                                      int64_t total_kept, int64_t dropped_before) {
  return kept ? group_start + rank : total_kept + dropped_before;
}

// The slot a permuted row comes from, or -1 for a dropped or padding row (it holds zeros).
MOE_HD inline int64_t row_slot(const int64_t* order, int64_t kept, int64_t row) {
  return row < kept ? order[row] : -1;
}

// The permuted row that holds a slot, or -1 if the slot was dropped (it contributes zero).
MOE_HD inline int64_t slot_row(const int64_t* inverse, int64_t kept, int64_t slot) {
  const int64_t row = inverse[slot];
  return row < kept ? row : -1;
}

// Steps 2 and 3 of the sort, once the rank of every slot within its group and the number of
// slots per group (`seen`) are known: kept counts and group starts, then every slot's row
// (kept slots by group and rank, dropped ones after, in slot order). Serial, O(G + S): the CPU
// runs it directly, the CUDA kernel in one thread.
MOE_HD inline void place_slots(const int64_t* ids, const int64_t* rank, const int64_t* seen,
                               int64_t S, int64_t num_groups, int64_t capacity, int64_t* counts,
                               int64_t* start, int64_t* order, int64_t* inverse) {
  int64_t total_kept = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    counts[g] = capacity < 0 ? seen[g] : (seen[g] < capacity ? seen[g] : capacity);
    start[g] = total_kept;
    total_kept += counts[g];
  }
  int64_t dropped = 0;
  for (int64_t s = 0; s < S; ++s) {
    const bool kept = within_capacity(rank[s], capacity);
    const int64_t row = destination_row(kept, start[ids[s]], rank[s], total_kept, dropped);
    dropped += kept ? 0 : 1;
    order[row] = s;
    inverse[s] = row;
  }
}

// permuted[row, d] = x[token(order[row]), d] * w[order[row]]   (0 for dropped rows)
template <typename scalar_t, typename acc_t>
MOE_HD inline scalar_t permute_value(const scalar_t* x, const int64_t* order, const float* w,
                                     int64_t k, int64_t kept, int64_t row, int64_t d,
                                     int64_t D) {
  const int64_t slot = row_slot(order, kept, row);
  if (slot < 0) return scalar_t(0);
  acc_t v = static_cast<acc_t>(x[token_of_slot(slot, k) * D + d]);
  if (w != nullptr) v *= static_cast<acc_t>(w[slot]);
  return static_cast<scalar_t>(v);
}

// out[t, d] = sum_j w[t*k+j] * y[inverse[t*k+j], d] over kept slots
template <typename scalar_t, typename acc_t>
MOE_HD inline scalar_t unpermute_value(const scalar_t* y, const int64_t* inverse, const float* w,
                                       int64_t k, int64_t kept, int64_t token, int64_t d,
                                       int64_t D) {
  acc_t acc = acc_t(0);
  for (int64_t j = 0; j < k; ++j) {
    const int64_t slot = token * k + j;
    const int64_t row = slot_row(inverse, kept, slot);
    if (row < 0) continue;
    acc_t v = static_cast<acc_t>(y[row * D + d]);
    if (w != nullptr) v *= static_cast<acc_t>(w[slot]);
    acc += v;
  }
  return static_cast<scalar_t>(acc);
}

// <a[token(slot)], b[inverse[slot]]> for the gradient of the combine weights (0 if dropped)
template <typename scalar_t, typename acc_t>
MOE_HD inline acc_t slot_dot(const scalar_t* a, const scalar_t* b, const int64_t* inverse,
                             int64_t k, int64_t kept, int64_t slot, int64_t D) {
  const int64_t row = slot_row(inverse, kept, slot);
  if (row < 0) return acc_t(0);
  const scalar_t* ar = a + token_of_slot(slot, k) * D;
  const scalar_t* br = b + row * D;
  acc_t acc = acc_t(0);
  for (int64_t d = 0; d < D; ++d) acc += static_cast<acc_t>(ar[d]) * static_cast<acc_t>(br[d]);
  return acc;
}

}  // namespace moe_ops
