// The grouped SwiGLU FFN of MoE experts and MoT modalities on CPU, every step of it run piece by
// piece, in float32 / float64 on exact rows and in bfloat16 / float16 on whole 16-row blocks.
// The gate and up weights are one tensor w13 (G, D, 2H): columns [0, H) of w13[g] are the
// gate's (w1), [H, 2H) the up product's (w3), as in HF's gate_up_proj and Megatron's fused fc1.
//
//   grouped_swiglu_forward(x (N, D), w13 (G, D, 2H), w2 (G, H, Do), ends [G], block)
//       -> y (N, Do), gate_up (N, 2H)             rows of group g: h w2[g], gate_up = x w13[g],
//                                                 h = silu(gate_up[:, :H]) * gate_up[:, H:]
//   grouped_swiglu_backward(grad (N, Do), x, w13, w2, gate_up, ends, needs [3], block)
//       -> grad_x, grad_w13, grad_w2              (an empty tensor where needs[i] is false)
//   routed_swiglu_forward(x (N, D), w13, w2, order, inverse, weights (S,), ends, k, block)
//       -> y (N, Do), gate_up (kept, 2H)          an MoE's experts between its dispatch and
//                                                 combine: y[t] = sum over t's kept slots of
//                                                 weights[slot] * FFN_group(x[t])
//   routed_swiglu_backward(grad (N, Do), x, w13, w2, gate_up, order, inverse, weights, ends, k,
//                          needs [4], block) -> grad_x, grad_weights (S,), grad_w13, grad_w2
//
// block: rows per block of the products, 0 = by dtype (16 in half precision: kHalfBlock in
// moe_group_plan.h; 1 otherwise).
//
// Rows are shared out among the threads as by the grouped products (moe_group_plan.h: one
// stretch of about equal rows per thread, cut a whole number of blocks after a group's start,
// in pieces of at most 2048 rows on blocks), and each thread runs all steps of the FFN on one
// piece (rows of one group in its stretch) before the next piece: one product with
// w13 for the gate and up halves, silu(gate) * up into a scratch buffer of the thread, the
// product with w2. The element-wise pass reads gate and up rows that were just written (a few MB
// per piece, in cache) instead of whole (N, H) tensors from memory, and h is neither kept nor
// saved: the backward recomputes it in the pass that takes the gate's gradient. Backward, per
// piece: grad_h = grad w2^T into the gate half of a (rows, 2H) scratch, one pass giving
// grad_gate over it, grad_up in the other half, and h (scratch), then grad_w2 += h^T grad,
// grad_x = grad_gate_up w13^T and grad_w13 += x^T grad_gate_up, one product each. Against
// separate w1 and w3 each piece runs three products fewer, wider ones that one core runs
// 3-5 % faster (README, Benchmarks). A group cut between two threads sums its weight gradients
// in the thread that holds its first rows; the other thread's share is added afterwards. Rows
// past the last end give zeros.
//
// On blocks (half precision, whose oneDNN products compile a kernel for every new shape: see
// group_gemm_cpu.cpp) every product runs the piece's rows rounded up to whole blocks, so it
// meets one of 128 row counts (16 to 2048). The extra rows are read in place where they are the
// groups' rows (else a thread's buffer holds the piece's rows and zeros), their results are
// written where the same thread's later pieces overwrite them, or, for the last thread, into
// block - 1 spare rows that the outputs' storage holds past their end (else into a buffer, whose
// piece rows are copied out), and in the backward the element-wise pass gives zero rows there,
// so they add nothing to the weight gradients. A thread's pieces of one group sum into its weight
// gradients in the output's dtype.
//
// The routed ops take the token rows and the dispatch's layout (moe_ops::sort_by_group: grouped
// row r is slot order[r] of token order[r] / k, kept = the last end) instead of permuted rows:
// each thread copies a piece's token rows into its own buffer just before the products that
// read them, and the forward ends with the weighted unpermute_rows. The backward gathers the
// output gradient's rows the same way, unweighted, and applies each row's combine weight in the
// element-wise pass, which also gives the weight's gradient as <grad_y w2^T, h> (= <grad_y,
// expert output>) from the h it recomputes; the rows' input gradients are summed per token by
// unpermute_rows. So neither the permuted rows nor the expert outputs are kept for the
// backward: at bench moe's size an MoE layer saves 120 MiB for it instead of 152 in float32.
//
// The readable definition is the per-group loop `GroupedSwiGLU.ffn(reference=True)`
// (moe/layers.py); without the compiled kernels the same FFN runs as separate passes
// (moe.cpu_gemm's grouped products and moe.fused.swiglu_halves).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "moe_group_plan.h"
#include "moe_index.h"
#include "moe_rows_cpu.h"
#include "moe_swiglu.h"

namespace moe_ops {
namespace {

// The element-wise passes over n elements: generic templates, and float32 / bfloat16 overloads
// compiled per instruction set (MOE_CLONES), which overload resolution prefers.
template <typename T>
void gate_forward(const T* a, const T* b, T* h, int64_t n) {
  swiglu_forward_range<T>(a, b, h, 0, n);
}

// g (h's gradient) is overwritten with grad_a; gb = grad_b; h = silu(a) * b where h is given.
template <typename T>
void gate_backward(T* g, const T* a, const T* b, T* gb, T* h, int64_t n) {
  if (h != nullptr) {
    swiglu_backward_range<T, true>(g, a, b, g, gb, 0, n, h);
  } else {
    swiglu_backward_range<T>(g, a, b, g, gb, 0, n);
  }
}

// The routed backward's pass over one row (moe_swiglu.h): returns the combine weight's gradient.
template <typename T>
acc_of<T> gate_backward_weighted(T* g, const T* a, const T* b, T* gb, T* hw, int64_t n,
                                 acc_of<T> w) {
  return swiglu_backward_weighted<T>(g, a, b, gb, hw, n, w);
}

#define FFN_CLONE_GATES(T)                                                                     \
  MOE_CLONES void gate_forward(const T* a, const T* b, T* h, int64_t n) {                      \
    swiglu_forward_range<T>(a, b, h, 0, n);                                                    \
  }                                                                                            \
  MOE_CLONES void gate_backward(T* g, const T* a, const T* b, T* gb, T* h, int64_t n) {        \
    if (h != nullptr) {                                                                        \
      swiglu_backward_range<T, true>(g, a, b, g, gb, 0, n, h);                                 \
    } else {                                                                                   \
      swiglu_backward_range<T>(g, a, b, g, gb, 0, n);                                          \
    }                                                                                          \
  }                                                                                            \
  MOE_CLONES float gate_backward_weighted(T* g, const T* a, const T* b, T* gb, T* hw,          \
                                          int64_t n, float w) {                                \
    return swiglu_backward_weighted<T>(g, a, b, gb, hw, n, w);                                 \
  }
FFN_CLONE_GATES(float)
FFN_CLONE_GATES(c10::BFloat16)

void check_ffn(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
               at::IntArrayRef ends) {
  const auto t = x.scalar_type();
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf),
              "x must be a contiguous (N, D) float32, float64, bfloat16 or float16 tensor");
  const int64_t G = static_cast<int64_t>(ends.size());
  TORCH_CHECK(w13.dim() == 3 && w13.size(0) == G && w13.size(1) == x.size(1) &&
                  w13.size(2) % 2 == 0 && w13.is_contiguous(),
              "w13 must be a contiguous (G, D, 2H) tensor, one [gate | up] matrix per group");
  TORCH_CHECK(w2.dim() == 3 && w2.size(0) == G && w2.size(1) == w13.size(2) / 2 &&
                  w2.is_contiguous(),
              "w2 must be a contiguous (G, H, D_out) tensor");
  for (const at::Tensor* w : {&w13, &w2}) {
    TORCH_CHECK(w->scalar_type() == x.scalar_type(), "weights must be of x's dtype");
  }
}

// Rows per block: as asked, or by dtype where 0 (whole kHalfBlock-row blocks in half precision,
// whose oneDNN products compile a kernel per shape; exact rows otherwise).
int64_t block_for(const at::Tensor& x, int64_t block) {
  TORCH_CHECK(block >= 0, "block must be 0 (by dtype) or a number of rows, got ", block);
  if (block > 0) return block;
  const auto t = x.scalar_type();
  return t == at::kBFloat16 || t == at::kHalf ? kHalfBlock : 1;
}

// The largest piece of a thread's run, in whole blocks: the rows its scratch buffers hold.
int64_t most_rows(const std::vector<Piece>& run, int64_t block) {
  int64_t most = 0;
  for (const Piece& p : run) most = std::max(most, p.end - p.start);
  return round_up(most, block);
}

// How the rows of a routed FFN (an MoE's top-k dispatch) reach it: grouped row r is the row of
// token order[r] / k of the input, and its output joins that token's with weight
// weights[order[r]].
struct Route {
  const int64_t* order;
  const float* weights;
  int64_t k;
};

// A piece's n rows of `src` with m - n more (m: n in whole blocks) for the products: in place
// where the m rows are all the groups' (below `done`, the last end: the rows after the piece's
// are other groups' or later pieces', whose products are thrown away or meet zero rows opposite
// in a weight gradient; a non-finite value there would reach that sum, in a step non-finite
// anyway), else, and for a routed FFN always (its token rows gathered), copied into `scratch`
// (a thread's buffer, in cache for the products that read it next) with zero rows after them.
at::Tensor piece_rows(const at::Tensor& src, const Route* route, const Piece& p, int64_t m,
                      int64_t done, const at::Tensor& scratch) {
  const int64_t n = p.end - p.start;
  if (route == nullptr && p.start + m <= done) return src.narrow(0, p.start, m);
  auto dst = scratch.narrow(0, 0, m);
  if (route == nullptr) {
    dst.narrow(0, 0, n).copy_(src.narrow(0, p.start, n));
  } else {
    const int64_t bytes = src.size(1) * src.element_size();
    const char* from = static_cast<const char*>(src.data_ptr());
    char* to = static_cast<char*>(dst.data_ptr());
    const int64_t* order = route->order + p.start;
    for (int64_t i = 0; i < n; ++i) {
      if (i + rows::kAhead < n) {
        rows::prefetch_row(from + token_of_slot(order[i + rows::kAhead], route->k) * bytes,
                           bytes);
      }
      std::memcpy(to + i * bytes, from + token_of_slot(order[i], route->k) * bytes, bytes);
    }
  }
  if (m > n) dst.narrow(0, n, m - n).zero_();
  return dst;
}

// Where a product of a piece's m rows goes: out's own rows from the piece's start where all m
// belong to this thread (rows below `limit`: the rows past the piece's are the same thread's
// later pieces', which overwrite them, or past the last end, zeroed at the end), else scratch,
// whose first n rows `place` copies into out.
at::Tensor out_rows(const at::Tensor& out, const Piece& p, int64_t m, int64_t limit,
                    const at::Tensor& scratch) {
  return p.start + m <= limit ? out.narrow(0, p.start, m) : scratch.narrow(0, 0, m);
}

void place(const at::Tensor& out, const Piece& p, const at::Tensor& rows) {
  auto dst = out.narrow(0, p.start, p.end - p.start);
  if (rows.data_ptr() != dst.data_ptr()) dst.copy_(rows.narrow(0, 0, p.end - p.start));
}

// The rows a run may write past a piece's end: up to its last piece's end, or for the last run
// to the end of the output's storage (`tall`).
int64_t write_limit(const std::vector<std::vector<Piece>>& runs, int64_t r, int64_t tall) {
  return r + 1 == static_cast<int64_t>(runs.size()) ? tall : runs[r].back().end;
}

// An output of `rows` rows whose storage runs block - 1 rows further: the last run's last
// piece, rounded up to whole blocks, then writes its products in place instead of into a buffer
// copied out afterwards (in bench moe's bfloat16 layer that copy was 0.5 ms of the forward's
// second thread: a (rows, 2H) gate_up piece). Returns the storage; narrow it to `rows`.
at::Tensor tall_rows(int64_t rows, int64_t width, int64_t block, const at::TensorOptions& o) {
  return at::empty({rows + block - 1, width}, o);
}

// y (rows, D_out), gate_up (rows, 2H) for the grouped rows: x's own rows, or routed x's token
// rows gathered piece by piece.
std::tuple<at::Tensor, at::Tensor> ffn_forward(const at::Tensor& x, const at::Tensor& w13,
                                               const at::Tensor& w2, at::IntArrayRef ends,
                                               int64_t rows, const Route* route, int64_t block) {
  const int64_t D = x.size(1), H2 = w13.size(2), H = H2 / 2, Do = w2.size(2);
  const auto y_tall = tall_rows(rows, Do, block, x.options());
  const auto gate_up_tall = tall_rows(rows, H2, block, x.options());
  auto y = y_tall.narrow(0, 0, rows), gate_up = gate_up_tall.narrow(0, 0, rows);
  const auto spans = spans_of(ends, rows);
  const int64_t done = spans.empty() ? 0 : spans.back().end;
  const auto runs = plan_for(spans, true, false, Cut(block));
  for_runs(runs, [&](int64_t r, const std::vector<Piece>& run) {
    if (run.empty()) return;
    const int64_t most = most_rows(run, block);
    const int64_t limit = write_limit(runs, r, y_tall.size(0));
    // buffers are allocated, not touched, until a piece needs them
    auto h = at::empty({most, H}, x.options()), xg = at::empty({most, D}, x.options());
    auto gu_spare = at::empty({most, H2}, x.options());
    auto y_spare = at::empty({most, Do}, x.options());
    for (const Piece& p : run) {
      const int64_t n = p.end - p.start, m = round_up(n, block);
      auto xs = piece_rows(x, route, p, m, done, xg);
      auto gus = out_rows(gate_up_tall, p, m, limit, gu_spare);
      at::mm_out(gus, xs, w13[p.group]);
      auto hs = h.narrow(0, 0, m);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                      "grouped_swiglu_forward", [&] {
        const scalar_t* gu = gus.data_ptr<scalar_t>();
        scalar_t* hp = hs.data_ptr<scalar_t>();
        for (int64_t i = 0; i < n; ++i) gate_forward(gu + i * H2, gu + i * H2 + H, hp + i * H, H);
      });
      auto ys = out_rows(y_tall, p, m, limit, y_spare);
      at::mm_out(ys, hs, w2[p.group]);  // rows past n: thrown away (h's are stale there)
      place(gate_up, p, gus);
      place(y, p, ys);
    }
  });
  for (auto* t : {&y, &gate_up}) {
    if (done < rows) t->narrow(0, done, rows - done).zero_();  // after any spill into them
  }
  return {y, gate_up};
}

// A thread's share of one group's weight gradients where another thread holds the group's
// first rows: added into the gradients after all threads are done.
struct Share {
  int64_t group;
  at::Tensor w13, w2;
};

struct Needs {
  bool x, w13, w2;
};

struct Grads {
  at::Tensor x, w13, w2;  // x: the grouped rows' gradient (rows, D)
};

// out = a^T b for a group's first piece in a run, out += a^T b for the next ones.
void weight_grad(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool first) {
  if (first) {
    at::mm_out(out, a.t(), b);
  } else {
    out.addmm_(a.t(), b);
  }
}

// The backward over the grouped rows. grad is the rows' output gradient (rows, D_out), or for a
// routed FFN the tokens' (N, D_out), gathered piece by piece, the combine weights applied in
// the element-wise pass, which also writes each kept slot's weight gradient into `dots`.
Grads ffn_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w13,
                   const at::Tensor& w2, const at::Tensor& gate_up, at::IntArrayRef ends,
                   int64_t rows, Needs need, const Route* route, float* dots, int64_t block) {
  const int64_t D = x.size(1), H2 = w13.size(2), H = H2 / 2, G = w13.size(0), Do = w2.size(2);
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(0) == rows && gate_up.size(1) == H2 &&
                  gate_up.is_contiguous() && gate_up.scalar_type() == x.scalar_type(),
              "gate_up must be the forward's contiguous (", rows, ", ", H2, ") tensor");
  // a routed FFN always runs the weighted pass: the combine weights' gradient needs h
  const bool need_gate = route != nullptr || need.x || need.w13;
  const bool need_h = route != nullptr || need.w2;
  auto none = [&] { return at::empty({0}, x.options()); };  // a gradient not asked for
  const auto gx_tall = need.x ? tall_rows(rows, D, block, x.options()) : none();
  Grads out{need.x ? gx_tall.narrow(0, 0, rows) : none(),
            need.w13 ? at::empty_like(w13) : none(), need.w2 ? at::empty_like(w2) : none()};
  const auto spans = spans_of(ends, rows);
  const int64_t done = spans.empty() ? 0 : spans.back().end;
  const auto runs = plan_for(spans, true, false, Cut(block));
  std::vector<std::vector<Share>> shares(runs.size());
  for_runs(runs, [&](int64_t r, const std::vector<Piece>& run) {
    if (run.empty()) return;
    const int64_t most = most_rows(run, block);
    const int64_t limit = write_limit(runs, r, need.x ? gx_tall.size(0) : rows);
    auto scratch = [&](int64_t width) { return at::empty({most, width}, x.options()); };
    auto ggu = scratch(H2);  // [grad_h, then grad_gate over it | grad_up]
    auto h = scratch(H), gg = scratch(Do), xg = scratch(D), gx_spare = scratch(D);
    at::Tensor t13, t2;  // the weight gradients the current group's pieces add into
    for (size_t j = 0; j < run.size(); ++j) {
      const Piece& p = run[j];
      const int64_t g = p.group, n = p.end - p.start, m = round_up(n, block);
      const bool first = j == 0 || run[j - 1].group != g;  // the run's first piece of g
      if (first) {  // the run holding the group's first rows writes them, another its share
        if (p.start == spans[g].start) {
          if (need.w13) t13 = out.w13[g];
          if (need.w2) t2 = out.w2[g];
        } else {
          if (need.w13) t13 = at::empty({D, H2}, x.options());
          if (need.w2) t2 = at::empty({H, Do}, x.options());
          shares[r].push_back({g, t13, t2});
        }
      }
      auto gr = piece_rows(grad, route, p, m, done, gg);
      auto ggus = ggu.narrow(0, 0, m), hs = h.narrow(0, 0, m);
      if (need_gate) {
        auto gh = ggus.narrow(1, 0, H);  // grad_h into the gate half: row stride 2H
        at::mm_out(gh, gr, w2[g].t());
      }
      if (need_gate || need_h) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                        "grouped_swiglu_backward", [&] {
          const scalar_t* gu = gate_up.data_ptr<scalar_t>() + p.start * H2;
          scalar_t* hp = need_h ? hs.data_ptr<scalar_t>() : nullptr;
          scalar_t* gp = need_gate ? ggus.data_ptr<scalar_t>() : nullptr;
          for (int64_t i = 0; i < n; ++i) {  // row i: gate at gu + i 2H, up H further
            const scalar_t* a = gu + i * H2;
            scalar_t* hi = hp != nullptr ? hp + i * H : nullptr;
            if (route != nullptr) {  // each row's combine weight
              const int64_t slot = route->order[p.start + i];
              dots[slot] = static_cast<float>(gate_backward_weighted(
                  gp + i * H2, a, a + H, gp + i * H2 + H, hi, H,
                  static_cast<acc_of<scalar_t>>(route->weights[slot])));
            } else if (need_gate) {
              gate_backward(gp + i * H2, a, a + H, gp + i * H2 + H, hi, H);
            } else {
              gate_forward(a, a + H, hi, H);
            }
          }
        });
        // the block's rows past the piece add nothing to the weight gradients
        if (m > n && need_gate) ggus.narrow(0, n, m - n).zero_();
        if (m > n && need_h) hs.narrow(0, n, m - n).zero_();
      }
      if (need.w2) weight_grad(t2, hs, gr, first);
      if (need.x) {
        auto gxs = out_rows(gx_tall, p, m, limit, gx_spare);
        at::mm_out(gxs, ggus, w13[g].t());
        place(out.x, p, gxs);
      }
      if (need.w13) weight_grad(t13, piece_rows(x, route, p, m, done, xg), ggus, first);
    }
  });
  for (const auto& run_shares : shares) {
    for (const Share& s : run_shares) {
      if (need.w13) out.w13[s.group].add_(s.w13);
      if (need.w2) out.w2[s.group].add_(s.w2);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    if (spans[g].end > spans[g].start) continue;
    for (auto* t : {&out.w13, &out.w2}) {
      if (t->numel() > 0) (*t)[g].zero_();  // no rows: no gradient
    }
  }
  if (need.x && done < rows) out.x.narrow(0, done, rows - done).zero_();
  return out;
}

Needs needs_of(at::IntArrayRef flags, size_t count, const char* names) {
  TORCH_CHECK(flags.size() == count, "needs must hold ", count, " flags (", names, "), got ",
              flags.size());
  const size_t o = count - 3;  // x, [weights,] w13, w2
  return {flags[0] != 0, flags[o + 1] != 0, flags[o + 2] != 0};
}

std::tuple<at::Tensor, at::Tensor> grouped_swiglu_forward_cpu(const at::Tensor& x,
                                                               const at::Tensor& w13,
                                                               const at::Tensor& w2,
                                                               at::IntArrayRef ends,
                                                               int64_t block) {
  check_ffn(x, w13, w2, ends);
  return ffn_forward(x, w13, w2, ends, x.size(0), nullptr, block_for(x, block));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_swiglu_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
    const at::Tensor& gate_up, at::IntArrayRef ends, at::IntArrayRef needs, int64_t block) {
  check_ffn(x, w13, w2, ends);
  const int64_t N = x.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == N && grad.size(1) == w2.size(2) &&
                  grad.is_contiguous() && grad.scalar_type() == x.scalar_type(),
              "grad must be a contiguous (N, D_out) tensor of x's dtype");
  auto g = ffn_backward(grad, x, w13, w2, gate_up, ends, N, needs_of(needs, 3, "x, w13, w2"),
                        nullptr, nullptr, block_for(x, block));
  return {g.x, g.w13, g.w2};
}

// The routed FFN's rows: kept = the last end, each kept row's slot checked (the gathers index
// with them); returns kept.
int64_t check_route(const at::Tensor& x, const at::Tensor& order, const at::Tensor& inverse,
                    const at::Tensor& weights, at::IntArrayRef ends, int64_t k) {
  for (const at::Tensor* t : {&order, &inverse}) {
    TORCH_CHECK(t->dim() == 1 && t->is_contiguous() && t->scalar_type() == at::kLong,
                "order and inverse must be contiguous 1-D int64 tensors");
  }
  const int64_t S = inverse.numel();
  TORCH_CHECK(k > 0 && S % k == 0 && x.size(0) == S / k,
              "k must divide the slots and x hold one row per token (", k, ", ", S, " slots, ",
              x.size(0), " rows)");
  TORCH_CHECK(weights.dim() == 1 && weights.numel() == S && weights.is_contiguous() &&
                  weights.scalar_type() == at::kFloat,
              "weights must be a contiguous (S,) float32 tensor, one per slot");
  const int64_t kept = ends.empty() ? 0 : ends.back();
  TORCH_CHECK(kept <= order.numel(), "the last end (", kept, ") must not pass order's ",
              order.numel(), " rows");
  const int64_t* ord = order.data_ptr<int64_t>();
  for (int64_t r = 0; r < kept; ++r) {
    TORCH_CHECK(ord[r] >= 0 && ord[r] < S, "order[", r, "] = ", ord[r], " is not a slot in [0, ",
                S, ")");
  }
  return kept;
}

// moe_ops::unpermute_rows through the dispatcher (its CPU kernel, moe_ops.cpp).
at::Tensor unpermute(const at::Tensor& y, const at::Tensor& order, const at::Tensor& inverse,
                     const std::optional<at::Tensor>& weights, int64_t k, int64_t kept) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moe_ops::unpermute_rows", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, int64_t, int64_t)>();
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(y, order, inverse, weights, k, kept);
}

std::tuple<at::Tensor, at::Tensor> routed_swiglu_forward_cpu(
    const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& order,
    const at::Tensor& inverse, const at::Tensor& weights, at::IntArrayRef ends, int64_t k,
    int64_t block) {
  check_ffn(x, w13, w2, ends);
  const int64_t kept = check_route(x, order, inverse, weights, ends, k);
  const Route route{order.data_ptr<int64_t>(), weights.data_ptr<float>(), k};
  auto [rows, gate_up] = ffn_forward(x, w13, w2, ends, kept, &route, block_for(x, block));
  return {unpermute(rows, order, inverse, weights, k, kept), gate_up};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_swiglu_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
    const at::Tensor& gate_up, const at::Tensor& order, const at::Tensor& inverse,
    const at::Tensor& weights, at::IntArrayRef ends, int64_t k, at::IntArrayRef needs,
    int64_t block) {
  check_ffn(x, w13, w2, ends);
  const int64_t kept = check_route(x, order, inverse, weights, ends, k);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == x.size(0) && grad.size(1) == w2.size(2) &&
                  grad.is_contiguous() && grad.scalar_type() == x.scalar_type(),
              "grad must be a contiguous (N, D_out) tensor of x's dtype");
  const Needs need = needs_of(needs, 4, "x, weights, w13, w2");
  const Route route{order.data_ptr<int64_t>(), weights.data_ptr<float>(), k};
  auto dots = at::zeros({inverse.numel()}, weights.options());  // dropped slots: 0
  auto g = ffn_backward(grad, x, w13, w2, gate_up, ends, kept, need, &route,
                        dots.data_ptr<float>(), block_for(x, block));
  // each token's gradient: the sum over its kept slots' rows (zero where none was kept)
  auto grad_x = need.x ? unpermute(g.x, order, inverse, std::nullopt, k, kept) : g.x;
  return {grad_x, needs[1] != 0 ? dots : at::empty({0}, weights.options()), g.w13, g.w2};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_ops, m) {
  m.def("grouped_swiglu_forward(Tensor x, Tensor w13, Tensor w2, int[] ends, "
        "int block=0) -> (Tensor, Tensor)");
  m.def("grouped_swiglu_backward(Tensor grad, Tensor x, Tensor w13, Tensor w2, Tensor gate_up, "
        "int[] ends, int[] needs, int block=0) -> (Tensor, Tensor, Tensor)");
  m.def("routed_swiglu_forward(Tensor x, Tensor w13, Tensor w2, Tensor order, Tensor inverse, "
        "Tensor weights, int[] ends, int k, int block=0) -> (Tensor, Tensor)");
  m.def("routed_swiglu_backward(Tensor grad, Tensor x, Tensor w13, Tensor w2, Tensor gate_up, "
        "Tensor order, Tensor inverse, Tensor weights, int[] ends, int k, int[] needs, "
        "int block=0) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moe_ops, CPU, m) {
  m.impl("grouped_swiglu_forward", &grouped_swiglu_forward_cpu);
  m.impl("grouped_swiglu_backward", &grouped_swiglu_backward_cpu);
  m.impl("routed_swiglu_forward", &routed_swiglu_forward_cpu);
  m.impl("routed_swiglu_backward", &routed_swiglu_backward_cpu);
}

}  // namespace moe_ops
