// How the grouped CPU products share their rows out among the threads (group_gemm_cpu.cpp,
// swiglu_ffn_cpu.cpp): groups' spans from their ends, the pieces each thread computes, and
// running one closure per thread. See group_gemm_cpu.cpp for why and how rows are cut.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace moe_ops {

constexpr int64_t kChunk = 2048;  // rows per product at most in blocks: few distinct shapes
constexpr int64_t kMinRows = 64;  // rows per thread at least, to share a product out
// Rows per block of the fused SwiGLU FFN's half-precision products (swiglu_ffn_cpu.cpp): 16
// (AMX's tile height) pads a piece by 8 rows on average where 64 padded it by 32, for four times
// as many distinct shapes for oneDNN to compile in the first steps; the grouped products
// (group_gemm_cpu.cpp) take their block from the caller (moe.cpu_gemm.BLOCK, 64).
constexpr int64_t kHalfBlock = 16;

// n rows rounded up to whole blocks.
inline int64_t round_up(int64_t n, int64_t block) { return (n + block - 1) / block * block; }

// How products cut their rows: whole `block`-row blocks in products of at most `chunk` rows
// (half precision), or block 1: exact rows in one product per piece (float32 / float64, whose
// BLAS kernels compile nothing per shape).
struct Cut {
  int64_t block, chunk;
  explicit Cut(int64_t b) : block(b), chunk(b > 1 ? kChunk : INT64_MAX) {}
};

struct Span {
  int64_t group, start, end;
};

inline std::vector<Span> spans_of(at::IntArrayRef ends, int64_t N) {
  std::vector<Span> spans;
  int64_t start = 0;
  for (int64_t g = 0; g < static_cast<int64_t>(ends.size()); ++g) {
    TORCH_CHECK(ends[g] >= start && ends[g] <= N, "ends must be non-decreasing in [0, ", N,
                "], got ", ends);
    spans.push_back({g, start, ends[g]});
    start = ends[g];
  }
  return spans;
}

// One piece of work: rows [start, end) of `group`.
struct Piece {
  int64_t group, start, end;
};

// The pieces each of `runs` threads computes, in row order: all groups' rows cut into `runs`
// stretches of about equal rows (a cut inside a group falls a whole number of blocks after its
// start), and each stretch into products of at most `cut.chunk` rows.
inline std::vector<std::vector<Piece>> plan(const std::vector<Span>& spans, int64_t runs,
                                     bool whole_groups, Cut cut_rows) {
  std::vector<std::vector<Piece>> out(runs);
  if (spans.empty()) return out;
  const int64_t first = spans.front().start, done = spans.back().end, total = done - first;
  std::vector<int64_t> bound(runs + 1, first);
  bound[runs] = done;
  for (int64_t t = 1; t < runs; ++t) {
    int64_t cut = first + total * t / runs;
    for (const Span& s : spans) {
      if (cut >= s.start && cut < s.end) {
        const int64_t step = whole_groups ? s.end - s.start : cut_rows.block;
        cut = std::min(s.end, s.start + (cut - s.start + step / 2) / step * step);
        break;
      }
    }
    bound[t] = std::max(bound[t - 1], cut);
  }
  for (int64_t t = 0; t < runs; ++t) {
    for (const Span& s : spans) {
      const int64_t lo = std::max(s.start, bound[t]), hi = std::min(s.end, bound[t + 1]);
      for (int64_t p = lo; p < hi; p += std::min(cut_rows.chunk, hi - p)) {
        out[t].push_back({s.group, p, p + std::min(cut_rows.chunk, hi - p)});
      }
    }
  }
  return out;
}

// Threads' stretches with `spread` (when every thread gets at least a block of rows), else one
// stretch whose products each use all threads. With `whole_groups` the stretches end at group
// boundaries only, and a split that would load a thread 20% above the mean is not taken.
inline std::vector<std::vector<Piece>> plan_for(const std::vector<Span>& spans, bool spread,
                                         bool whole_groups, Cut cut) {
  const int64_t threads = at::get_num_threads();
  const int64_t total = spans.empty() ? 0 : spans.back().end - spans.front().start;
  if (!spread || threads < 2 || total < threads * kMinRows) return plan(spans, 1, false, cut);
  auto runs = plan(spans, threads, whole_groups, cut);
  if (whole_groups) {
    for (const auto& run : runs) {
      int64_t rows = 0;
      for (const Piece& p : run) rows += p.end - p.start;
      if (rows * threads * 5 > total * 6) return plan(spans, 1, false, cut);
    }
  }
  return runs;
}

// Runs f(run index, its pieces) for every run, each on its own thread.
template <typename F>
void for_runs(const std::vector<std::vector<Piece>>& runs, F&& f) {
  auto run_one = [&](int64_t r) {
    // worker threads start with autograd on: the products here are below it, like this kernel
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    f(r, runs[r]);
  };
  if (runs.size() == 1) {
    run_one(0);
    return;
  }
  at::parallel_for(0, static_cast<int64_t>(runs.size()), 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) run_one(r);
  });
}

}  // namespace moe_ops
