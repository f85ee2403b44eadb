// Grouped GEMMs on CPU with the groups shared out among the threads (one thread per group at a
// time), for the many mid-sized products of an MoE layer.
//
//   group_rows_mm(a (N, K), b (G, K, M) or its (G, M, K) transpose, ends [G])  -> (N, M)
//       rows [ends[g-1], ends[g]) of the result = those rows of a @ b[g]; rows past the last
//       end are zero
//   group_inner_mm(a (N, Ka), b (N, Kb), ends [G])                             -> (G, Ka, Kb)
//       result[g] = a[rows of g]^T @ b[rows of g] (zero for an empty group)
//
// Why: a mid-sized product (1024 x 512 x 1024 in bfloat16) gains only ~1.6x from a second thread,
// so two of them side by side, one per thread, finish sooner than one after the other on both.
// With `spread`, each thread takes a run of consecutive groups with about equal rows; when no
// such split exists (a few unequal groups, as MoT's modalities often are), the groups run one
// after another with every thread on each product, as they do without `spread`.
//
// Shapes: oneDNN compiles a kernel for every new shape in half precision (2-8 ms, moe/cpu_gemm.py)
// and group sizes change every step. So each group runs in chunks of 1024 rows, then whole
// 64-row blocks: every product has one of 16 row counts (64, 128, ..., 1024), all compiled after a
// short warm-up, whatever the group sizes. A group's last block spills into the next group's
// rows, which that group (on the same thread) then overwrites; the last group of a thread's run
// computes its tail padded on the side instead. Weight gradients add the chunks' products in the
// output's dtype.
// The readable reference is the per-group loop `moe.grouping.grouped_linear_reference`.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace moe_ops {
namespace {

constexpr int64_t kBlock = 64;
constexpr int64_t kChunk = 1024;  // rows per product at most: few distinct shapes (see above)

struct Span {
  int64_t group, start, end;
};

std::vector<Span> spans_of(at::IntArrayRef ends, int64_t N) {
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

// The groups of each thread: `threads` runs of consecutive groups with about equal rows, or one
// run of every group when that split would load a thread 20% above the mean (then each product
// uses all threads instead).
std::vector<std::vector<Span>> plan_runs(const std::vector<Span>& spans, int64_t threads,
                                         bool spread) {
  const int64_t total = spans.empty() ? 0 : spans.back().end - spans.front().start;
  if (!spread || threads < 2 || static_cast<int64_t>(spans.size()) < threads || total == 0) {
    return {spans};
  }
  std::vector<std::vector<Span>> runs(1);
  int64_t rows = 0, heaviest = 0;
  for (size_t i = 0; i < spans.size(); ++i) {
    const int64_t n = spans[i].end - spans[i].start;
    // start the next run when this group would carry the current one past its share
    const int64_t left = static_cast<int64_t>(runs.size()) < threads ? 1 : 0;
    if (left && !runs.back().empty() &&
        rows + n / 2 > total * static_cast<int64_t>(runs.size()) / threads) {
      runs.emplace_back();
    }
    runs.back().push_back(spans[i]);
    rows += n;
  }
  int64_t start = spans.front().start;
  for (const auto& run : runs) {
    heaviest = std::max(heaviest, run.back().end - start);
    start = run.back().end;
  }
  if (static_cast<int64_t>(runs.size()) < 2 || heaviest * threads * 5 > total * 6) return {spans};
  return runs;
}

// Runs f(span, last_of_run) for every group, each run of groups in order on its own thread.
template <typename F>
void for_groups(const std::vector<Span>& spans, bool spread, F&& f) {
  const auto runs = plan_runs(spans, at::get_num_threads(), spread);
  auto run_one = [&](const std::vector<Span>& run) {
    // worker threads start with autograd on: the products here are below it, like this kernel
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (size_t i = 0; i < run.size(); ++i) f(run[i], i + 1 == run.size());
  };
  if (runs.size() == 1) {
    run_one(runs[0]);
    return;
  }
  at::parallel_for(0, static_cast<int64_t>(runs.size()), 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) run_one(runs[r]);
  });
}

// out[s:e] = a[s:e] @ bg: whole chunks, then the rest on whole 64-row blocks. With `spill`, the
// last block runs on past e into rows that a later product of the same thread overwrites (or
// that the caller zeroes); without, the tail runs padded to one block on the side.
void rows_product(const at::Tensor& a, const at::Tensor& bg, at::Tensor& out, int64_t s,
                  int64_t e, bool spill) {
  for (; e - s >= kChunk; s += kChunk) {
    auto dst = out.narrow(0, s, kChunk);
    at::mm_out(dst, a.narrow(0, s, kChunk), bg);
  }
  const int64_t stop = s + (e - s + kBlock - 1) / kBlock * kBlock;
  if (spill && stop <= a.size(0)) {
    if (stop > s) {
      auto dst = out.narrow(0, s, stop - s);
      at::mm_out(dst, a.narrow(0, s, stop - s), bg);
    }
    return;
  }
  const int64_t cut = s + (e - s) / kBlock * kBlock;
  if (cut > s) {
    auto dst = out.narrow(0, s, cut - s);
    at::mm_out(dst, a.narrow(0, s, cut - s), bg);
  }
  if (e > cut) {
    auto padded = at::zeros({kBlock, a.size(1)}, a.options());
    padded.narrow(0, 0, e - cut).copy_(a.narrow(0, cut, e - cut));
    out.narrow(0, cut, e - cut).copy_(at::mm(padded, bg).narrow(0, 0, e - cut));
  }
}

// outg = a[s:e]^T @ b[s:e]: whole chunks and whole blocks accumulated (in outg's dtype), then
// the tail padded to one block.
void inner_product(const at::Tensor& a, const at::Tensor& b, at::Tensor outg, int64_t s,
                   int64_t e) {
  bool first = true;
  auto add = [&](const at::Tensor& x, const at::Tensor& y) {
    if (first) {
      at::mm_out(outg, x, y);
    } else {
      outg.addmm_(x, y);
    }
    first = false;
  };
  for (; e - s >= kChunk; s += kChunk) add(a.narrow(0, s, kChunk).t(), b.narrow(0, s, kChunk));
  const int64_t cut = s + (e - s) / kBlock * kBlock;
  if (cut > s) add(a.narrow(0, s, cut - s).t(), b.narrow(0, s, cut - s));
  if (e > cut) {
    auto pa = at::zeros({kBlock, a.size(1)}, a.options());
    auto pb = at::zeros({kBlock, b.size(1)}, b.options());
    pa.narrow(0, 0, e - cut).copy_(a.narrow(0, cut, e - cut));
    pb.narrow(0, 0, e - cut).copy_(b.narrow(0, cut, e - cut));
    add(pa.t(), pb);
  }
  if (first) outg.zero_();
}

at::Tensor group_rows_mm_cpu(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef ends,
                             bool spread) {
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous(), "a must be a contiguous (N, K) tensor");
  TORCH_CHECK(b.dim() == 3 && b.size(0) == static_cast<int64_t>(ends.size()) &&
                  b.size(1) == a.size(1) && b.scalar_type() == a.scalar_type(),
              "b must be (G, K, M) (or a transposed view) of a's dtype, one matrix per group");
  const int64_t N = a.size(0);
  const auto spans = spans_of(ends, N);
  auto out = at::empty({N, b.size(2)}, a.options());
  const int64_t done = spans.empty() ? 0 : spans.back().end;
  for_groups(spans, spread, [&](const Span& s, bool last_of_run) {
    // the last group of every thread's run may only spill past the last group's rows
    const bool spill = !last_of_run || s.end == done;
    if (s.end > s.start) rows_product(a, b[s.group], out, s.start, s.end, spill);
  });
  if (done < N) out.narrow(0, done, N - done).zero_();  // after any spill into them
  return out;
}

at::Tensor group_inner_mm_cpu(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef ends,
                              bool spread) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0) && a.is_contiguous() &&
                  b.is_contiguous() && a.scalar_type() == b.scalar_type(),
              "a and b must be contiguous (N, Ka) and (N, Kb) tensors of one dtype");
  const auto spans = spans_of(ends, a.size(0));
  auto out = at::empty({static_cast<int64_t>(spans.size()), a.size(1), b.size(1)}, a.options());
  for_groups(spans, spread, [&](const Span& s, bool) {
    inner_product(a, b, out[s.group], s.start, s.end);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_ops, m) {
  m.def("group_rows_mm(Tensor a, Tensor b, int[] ends, bool spread) -> Tensor");
  m.def("group_inner_mm(Tensor a, Tensor b, int[] ends, bool spread) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_ops, CPU, m) {
  m.impl("group_rows_mm", &group_rows_mm_cpu);
  m.impl("group_inner_mm", &group_inner_mm_cpu);
}

}  // namespace moe_ops
