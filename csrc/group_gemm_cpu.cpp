// Grouped GEMMs on CPU with the work shared out among the threads, one product per thread at a
// time, for the mid-sized products of MoE experts and MoT modalities.
//
//   group_rows_mm(a (N, K), b (G, K, M) or its (G, M, K) transpose, ends [G], spread, block)
//       -> (N, M): rows [ends[g-1], ends[g]) of the result = those rows of a @ b[g]; rows past
//       the last end are zero
//   group_inner_mm(a (N, Ka), b (N, Kb), ends [G], spread, block)      -> (G, Ka, Kb)
//       result[g] = a[rows of g]^T @ b[rows of g] (zero for an empty group)
//
// Why: a mid-sized product (1024 x 512 x 1024 in bfloat16) gains only ~1.6x from a second thread,
// so two of them side by side, one per thread, finish sooner than one after the other on both;
// small float32 products too (8 experts of 512 x 128 x 192: 5 % less time for an MoE layer's
// forward and backward than torch's grouped_mm, which runs the groups in turn).
// With `spread`, the rows of all groups are cut into one stretch per thread with about equal rows
// (cutting a group where needed, a whole number of blocks after its start), each thread running
// its stretch's products on its own. Weight gradients (sums over a group's rows) share out whole
// groups only, when that balances the threads. Without `spread`, the groups run one after
// another with every thread on each product.
//
// Shapes (block 64, for half precision; block 1 computes exact rows and skips all of this):
// oneDNN compiles a kernel for every new shape in half precision (2-8 ms, moe/cpu_gemm.py)
// and group sizes change every step. So each group runs in chunks of 2048 rows, then whole
// 64-row blocks: every product has one of 32 row counts (64, 128, ..., 2048), all compiled after a
// short warm-up, whatever the group sizes. A product's last block may spill into rows that later
// products of the same thread overwrite; a thread's last product, which may not spill, ends its
// blocks at its own end and starts them back inside rows the thread computed before (putting
// those rows back afterwards), or, without such rows, computes its tail padded on the side; no
// thread writes another's rows. Weight gradients add the chunks' products in the output's dtype,
// the last partial block padded.
// The readable reference is the per-group loop `moe.grouping.grouped_linear_reference`.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "moe_group_plan.h"

namespace moe_ops {
namespace {

// out[lo:lo+n] = a[lo:lo+n] @ bg.
void rows_times(const at::Tensor& a, const at::Tensor& bg, at::Tensor& out, int64_t lo,
                int64_t n) {
  auto dst = out.narrow(0, lo, n);
  at::mm_out(dst, a.narrow(0, lo, n), bg);
}

// out[s:e] = a[s:e] @ bg: whole chunks, then the rest on whole 64-row
// blocks. The last block may run on past e up to row `limit` (rows that later products of the
// same thread overwrite, or that the caller zeroes). Where it may not, the blocks end at e
// instead and start up to 63 rows before s, inside rows [floor, s) that this thread computed
// already: those rows are put back afterwards. Only without such rows does the tail run padded
// to one block on the side (a separate product, which costs about as much again as packing the
// weight).
void rows_product(const at::Tensor& a, const at::Tensor& bg, at::Tensor& out, int64_t s,
                  int64_t e, int64_t floor, int64_t limit, Cut cut_rows) {
  const int64_t block = cut_rows.block;
  for (; e - s >= cut_rows.chunk; s += cut_rows.chunk) rows_times(a, bg, out, s, cut_rows.chunk);
  const int64_t rows = round_up(e - s, block);
  if (rows == 0) return;
  if (s + rows <= limit) {
    rows_times(a, bg, out, s, rows);
    return;
  }
  const int64_t back = e - rows;  // the blocks end at e
  if (back >= floor) {
    auto kept = out.narrow(0, back, s - back).clone();  // done rows the blocks run over
    rows_times(a, bg, out, back, rows);
    out.narrow(0, back, s - back).copy_(kept);
    return;
  }
  const int64_t cut = s + (e - s) / block * block;
  if (cut > s) rows_times(a, bg, out, s, cut - s);
  if (e > cut) {
    auto padded = at::zeros({block, a.size(1)}, a.options());
    padded.narrow(0, 0, e - cut).copy_(a.narrow(0, cut, e - cut));
    out.narrow(0, cut, e - cut).copy_(at::mm(padded, bg).narrow(0, 0, e - cut));
  }
}

// outg = a[s:e]^T @ b[s:e] (`first`), or outg += that: whole chunks and whole blocks accumulated
// in outg's dtype, then the partial block. A partial block is either one more product over a
// padded block added into outg (a pass over the whole output), or, where copying the narrower
// operand's rows costs fewer bytes than that pass, folded into the last product: the narrower
// operand's rows copied into whole blocks with zero rows around them, the wider one read in
// place over the same whole blocks (past e into the next groups' rows, or before s at the end:
// zero rows opposite make them count for nothing; only rows of [begin, done), the groups' rows,
// are read, and a non-finite value there would reach this sum, in a step non-finite anyway).
void inner_product(const at::Tensor& a, const at::Tensor& b, at::Tensor outg, int64_t s,
                   int64_t e, bool first, int64_t begin, int64_t done, Cut cut_rows) {
  const int64_t block = cut_rows.block, chunk = cut_rows.chunk;
  auto add = [&](const at::Tensor& x, const at::Tensor& y) {
    if (first) {
      at::mm_out(outg, x, y);
    } else {
      outg.addmm_(x, y);
    }
    first = false;
  };
  for (; e - s >= chunk; s += chunk) add(a.narrow(0, s, chunk).t(), b.narrow(0, s, chunk));
  const int64_t n = e - s, rows = round_up(n, block);
  const bool pad_a = a.size(1) <= b.size(1);
  const int64_t narrow = pad_a ? a.size(1) : b.size(1);
  const int64_t lo = s + rows <= done ? s : e - rows;  // the whole blocks read in place
  if (n % block != 0 && lo >= begin && n * narrow < 2 * a.size(1) * b.size(1)) {
    const at::Tensor& src = pad_a ? a : b;
    auto padded = at::empty({rows, narrow}, src.options());
    const int64_t offset = s - lo;  // where the rows go: zeros before and after
    if (offset > 0) padded.narrow(0, 0, offset).zero_();
    padded.narrow(0, offset, n).copy_(src.narrow(0, s, n));
    if (offset + n < rows) padded.narrow(0, offset + n, rows - offset - n).zero_();
    if (pad_a) {
      add(padded.t(), b.narrow(0, lo, rows));
    } else {
      add(a.narrow(0, lo, rows).t(), padded);
    }
    return;
  }
  const int64_t cut = s + n / block * block;
  if (cut > s) add(a.narrow(0, s, cut - s).t(), b.narrow(0, s, cut - s));
  if (e > cut) {
    auto pa = at::zeros({block, a.size(1)}, a.options());
    auto pb = at::zeros({block, b.size(1)}, b.options());
    pa.narrow(0, 0, e - cut).copy_(a.narrow(0, cut, e - cut));
    pb.narrow(0, 0, e - cut).copy_(b.narrow(0, cut, e - cut));
    add(pa.t(), pb);
  }
  if (first) outg.zero_();  // no rows
}

// (N, M): rows of group g = a's rows times b[g], computed piece by piece.
at::Tensor group_rows_mm_cpu(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef ends,
                             bool spread, int64_t block) {
  TORCH_CHECK(block >= 1, "block must be at least 1, got ", block);
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous(), "a must be a contiguous (N, K) tensor");
  TORCH_CHECK(b.dim() == 3 && b.size(0) == static_cast<int64_t>(ends.size()) &&
                  b.size(1) == a.size(1) && b.scalar_type() == a.scalar_type(),
              "b must be (G, K, M) (or a transposed view) of a's dtype, one matrix per group");
  const int64_t N = a.size(0);
  const auto spans = spans_of(ends, N);
  auto out = at::empty({N, b.size(2)}, a.options());
  const int64_t done = spans.empty() ? 0 : spans.back().end;
  const Cut cut(block);
  const auto runs = plan_for(spans, spread, false, cut);
  for_runs(runs, [&](int64_t r, const std::vector<Piece>& run) {
    if (run.empty()) return;
    // a block may spill into the rows of the run's later pieces, and the last run's past the
    // last group's rows: never into another thread's
    const int64_t limit = r + 1 == static_cast<int64_t>(runs.size()) ? N : run.back().end;
    const int64_t floor = run.front().start;  // rows below belong to other threads
    for (const Piece& p : run) {
      rows_product(a, b[p.group], out, p.start, p.end, floor, limit, cut);
    }
  });
  if (done < N) out.narrow(0, done, N - done).zero_();  // after any spill into them
  return out;
}

// (G, Ka, Kb): group g = a[rows of g]^T @ b[rows of g], piece by piece.
at::Tensor group_inner_mm_cpu(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef ends,
                              bool spread, int64_t block) {
  TORCH_CHECK(block >= 1, "block must be at least 1, got ", block);
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0) && a.is_contiguous() &&
                  b.is_contiguous() && a.scalar_type() == b.scalar_type(),
              "a and b must be contiguous (N, Ka) and (N, Kb) tensors of one dtype");
  const auto spans = spans_of(ends, a.size(0));
  const int64_t G = static_cast<int64_t>(spans.size());
  auto out = at::empty({G, a.size(1), b.size(1)}, a.options());
  // whole groups per thread, where that balances: a group cut between threads would need a
  // partial sum per thread, which costs more than it gains
  const Cut cut(block);
  const auto runs = plan_for(spans, spread, true, cut);
  const int64_t begin = G ? spans.front().start : 0, done = G ? spans.back().end : 0;
  std::vector<char> written(G, 0);
  for_runs(runs, [&](int64_t, const std::vector<Piece>& run) {
    for (size_t i = 0; i < run.size(); ++i) {
      const Piece& p = run[i];
      const bool first = i == 0 || run[i - 1].group != p.group;
      inner_product(a, b, out[p.group], p.start, p.end, first, begin, done, cut);
      written[p.group] = 1;  // each group belongs to one run
    }
  });
  for (int64_t g = 0; g < G; ++g) {
    if (!written[g]) out[g].zero_();  // empty groups
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_ops, m) {
  m.def("group_rows_mm(Tensor a, Tensor b, int[] ends, bool spread, int block=64) -> Tensor");
  m.def("group_inner_mm(Tensor a, Tensor b, int[] ends, bool spread, int block=64) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_ops, CPU, m) {
  m.impl("group_rows_mm", &group_rows_mm_cpu);
  m.impl("group_inner_mm", &group_inner_mm_cpu);
}

}  // namespace moe_ops
