// The grouped SwiGLU FFN of MoE experts and MoT modalities on CPU in float32 / float64, every
// step of it run piece by piece:
//
//   grouped_swiglu_forward(x (N, D), w1, w3 (G, D, H), w2 (G, H, Do), ends [G])
//       -> y (N, Do), gate (N, H), up (N, H)       rows of group g: (silu(x w1[g]) * x w3[g]) w2[g]
//   grouped_swiglu_backward(grad (N, Do), x, w1, w3, w2, gate, up, ends, needs [4])
//       -> grad_x, grad_w1, grad_w3, grad_w2       (an empty tensor where needs[i] is false)
//
// Rows are shared out among the threads as by the grouped products (moe_group_plan.h, exact
// rows: one stretch of about equal rows per thread), and each thread runs all steps of the FFN
// on one piece (the rows of one group in its stretch) before the next piece: the gate and up
// products, silu(gate) * up into a scratch buffer of the thread, the product with w2. The
// element-wise pass reads gate and up rows that were just written (a few MB per piece, in
// cache) instead of whole (N, H) tensors from memory, and h is neither kept nor saved: the
// backward recomputes it in the pass that takes the gate's gradient. Backward, per piece:
// grad_h = grad w2^T (scratch), one pass giving grad_gate (over grad_h), grad_up and h
// (scratch), then grad_w2 += h^T grad, grad_x = grad_gate w1^T + grad_up w3^T,
// grad_w1 += x^T grad_gate, grad_w3 += x^T grad_up. A group cut between two threads sums its
// weight gradients in the thread that holds its first rows; the other thread's share is added
// afterwards. Rows past the last end give zeros.
//
// Half precision keeps the separate passes of csrc/autograd.cpp, whose products run whole
// 64-row blocks (group_gemm_cpu.cpp) that pieces of exact rows would not. The readable
// definition is the per-group loop `GroupedSwiGLU.ffn(reference=True)` (moe/layers.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "moe_group_plan.h"
#include "moe_swiglu.h"

namespace moe_ops {
namespace {

// The element-wise passes over n elements: generic templates, and float32 overloads compiled
// per instruction set (MOE_CLONES), which overload resolution prefers.
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

MOE_CLONES void gate_forward(const float* a, const float* b, float* h, int64_t n) {
  swiglu_forward_range<float>(a, b, h, 0, n);
}

MOE_CLONES void gate_backward(float* g, const float* a, const float* b, float* gb, float* h,
                              int64_t n) {
  if (h != nullptr) {
    swiglu_backward_range<float, true>(g, a, b, g, gb, 0, n, h);
  } else {
    swiglu_backward_range<float>(g, a, b, g, gb, 0, n);
  }
}

void check_ffn(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3,
               const at::Tensor& w2, at::IntArrayRef ends) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "x must be a contiguous (N, D) float32 or float64 tensor");
  const int64_t G = static_cast<int64_t>(ends.size());
  TORCH_CHECK(w1.dim() == 3 && w1.size(0) == G && w1.size(1) == x.size(1) && w1.is_contiguous(),
              "w1 must be a contiguous (G, D, H) tensor, one matrix per group");
  TORCH_CHECK(w3.sizes() == w1.sizes() && w3.is_contiguous(), "w3 must be shaped as w1");
  TORCH_CHECK(w2.dim() == 3 && w2.size(0) == G && w2.size(1) == w1.size(2) && w2.is_contiguous(),
              "w2 must be a contiguous (G, H, D_out) tensor");
  for (const at::Tensor* w : {&w1, &w3, &w2}) {
    TORCH_CHECK(w->scalar_type() == x.scalar_type(), "weights must be of x's dtype");
  }
}

// The largest piece of a thread's run: the rows its scratch buffers hold.
int64_t most_rows(const std::vector<Piece>& run) {
  int64_t most = 0;
  for (const Piece& p : run) most = std::max(most, p.end - p.start);
  return most;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_swiglu_forward_cpu(
    const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2,
    at::IntArrayRef ends) {
  check_ffn(x, w1, w3, w2, ends);
  const int64_t N = x.size(0), H = w1.size(2);
  auto y = at::empty({N, w2.size(2)}, x.options());
  auto gate = at::empty({N, H}, x.options());
  auto up = at::empty({N, H}, x.options());
  const auto spans = spans_of(ends, N);
  const int64_t done = spans.empty() ? 0 : spans.back().end;
  const auto runs = plan_for(spans, true, false, Cut(1));
  for_runs(runs, [&](int64_t, const std::vector<Piece>& run) {
    auto h = at::empty({most_rows(run), H}, x.options());
    for (const Piece& p : run) {
      const int64_t n = p.end - p.start;
      auto xs = x.narrow(0, p.start, n), gs = gate.narrow(0, p.start, n);
      auto us = up.narrow(0, p.start, n), hs = h.narrow(0, 0, n);
      at::mm_out(gs, xs, w1[p.group]);
      at::mm_out(us, xs, w3[p.group]);
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grouped_swiglu_forward", [&] {
        gate_forward(gs.data_ptr<scalar_t>(), us.data_ptr<scalar_t>(), hs.data_ptr<scalar_t>(),
                     n * H);
      });
      auto ys = y.narrow(0, p.start, n);
      at::mm_out(ys, hs, w2[p.group]);
    }
  });
  for (auto* t : {&y, &gate, &up}) {
    if (done < N) t->narrow(0, done, N - done).zero_();
  }
  return {y, gate, up};
}

// A thread's share of one group's weight gradients where another thread holds the group's
// first rows: added into the gradients after all threads are done.
struct Share {
  int64_t group;
  at::Tensor w1, w3, w2;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_swiglu_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3,
    const at::Tensor& w2, const at::Tensor& gate, const at::Tensor& up, at::IntArrayRef ends,
    at::IntArrayRef needs) {
  check_ffn(x, w1, w3, w2, ends);
  const int64_t N = x.size(0), D = x.size(1), H = w1.size(2), G = w1.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == N && grad.size(1) == w2.size(2) &&
                  grad.is_contiguous() && grad.scalar_type() == x.scalar_type(),
              "grad must be a contiguous (N, D_out) tensor of x's dtype");
  for (const at::Tensor* t : {&gate, &up}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == H && t->is_contiguous() &&
                    t->scalar_type() == x.scalar_type(),
                "gate and up must be the forward's contiguous (N, H) tensors");
  }
  TORCH_CHECK(needs.size() == 4, "needs must hold 4 flags (x, w1, w3, w2), got ", needs.size());
  const bool need_x = needs[0] != 0, need_w1 = needs[1] != 0, need_w3 = needs[2] != 0,
             need_w2 = needs[3] != 0, need_gate = need_x || need_w1 || need_w3;
  auto none = [&] { return at::empty({0}, x.options()); };  // a gradient not asked for
  auto grad_x = need_x ? at::empty({N, D}, x.options()) : none();
  auto grad_w1 = need_w1 ? at::empty_like(w1) : none();
  auto grad_w3 = need_w3 ? at::empty_like(w3) : none();
  auto grad_w2 = need_w2 ? at::empty_like(w2) : none();
  const auto spans = spans_of(ends, N);
  const int64_t done = spans.empty() ? 0 : spans.back().end;
  const auto runs = plan_for(spans, true, false, Cut(1));
  std::vector<std::vector<Share>> shares(runs.size());
  for_runs(runs, [&](int64_t r, const std::vector<Piece>& run) {
    const int64_t most = most_rows(run);
    // grad_h, then grad_gate over it
    auto gh = need_gate ? at::empty({most, H}, x.options()) : at::Tensor();
    auto gu = need_gate ? at::empty({most, H}, x.options()) : at::Tensor();
    auto h = need_w2 ? at::empty({most, H}, x.options()) : at::Tensor();
    // exact rows: a run holds at most one piece of each group
    for (const Piece& p : run) {
      const int64_t g = p.group, n = p.end - p.start;
      // weight gradients: the run holding the group's first rows writes them, another its share
      at::Tensor t1, t3, t2;
      if (p.start == spans[g].start) {
        if (need_w1) t1 = grad_w1[g];
        if (need_w3) t3 = grad_w3[g];
        if (need_w2) t2 = grad_w2[g];
      } else {
        if (need_w1) t1 = at::empty({D, H}, x.options());
        if (need_w3) t3 = at::empty({D, H}, x.options());
        if (need_w2) t2 = at::empty({H, w2.size(2)}, x.options());
        shares[r].push_back({g, t1, t3, t2});
      }
      auto xs = x.narrow(0, p.start, n), gr = grad.narrow(0, p.start, n);
      auto ghs = need_gate ? gh.narrow(0, 0, n) : at::Tensor();
      auto gus = need_gate ? gu.narrow(0, 0, n) : at::Tensor();
      auto hs = need_w2 ? h.narrow(0, 0, n) : at::Tensor();
      if (need_gate) at::mm_out(ghs, gr, w2[g].t());
      if (need_gate || need_w2) {
        AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grouped_swiglu_backward", [&] {
          const scalar_t* a = gate.data_ptr<scalar_t>() + p.start * H;
          const scalar_t* b = up.data_ptr<scalar_t>() + p.start * H;
          scalar_t* hp = need_w2 ? hs.data_ptr<scalar_t>() : nullptr;
          if (need_gate) {
            gate_backward(ghs.data_ptr<scalar_t>(), a, b, gus.data_ptr<scalar_t>(), hp, n * H);
          } else {
            gate_forward(a, b, hp, n * H);
          }
        });
      }
      if (need_w2) at::mm_out(t2, hs.t(), gr);
      if (need_x) {
        auto gxs = grad_x.narrow(0, p.start, n);
        at::mm_out(gxs, ghs, w1[g].t());
        gxs.addmm_(gus, w3[g].t());
      }
      if (need_w1) at::mm_out(t1, xs.t(), ghs);
      if (need_w3) at::mm_out(t3, xs.t(), gus);
    }
  });
  for (const auto& run_shares : shares) {
    for (const Share& s : run_shares) {
      if (need_w1) grad_w1[s.group].add_(s.w1);
      if (need_w3) grad_w3[s.group].add_(s.w3);
      if (need_w2) grad_w2[s.group].add_(s.w2);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    if (spans[g].end > spans[g].start) continue;
    for (auto* t : {&grad_w1, &grad_w3, &grad_w2}) {
      if (t->numel() > 0) (*t)[g].zero_();  // no rows: no gradient
    }
  }
  if (need_x && done < N) grad_x.narrow(0, done, N - done).zero_();
  return {grad_x, grad_w1, grad_w3, grad_w2};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_ops, m) {
  m.def("grouped_swiglu_forward(Tensor x, Tensor w1, Tensor w3, Tensor w2, int[] ends) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("grouped_swiglu_backward(Tensor grad, Tensor x, Tensor w1, Tensor w3, Tensor w2, "
        "Tensor gate, Tensor up, int[] ends, int[] needs) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moe_ops, CPU, m) {
  m.impl("grouped_swiglu_forward", &grouped_swiglu_forward_cpu);
  m.impl("grouped_swiglu_backward", &grouped_swiglu_backward_cpu);
}

}  // namespace moe_ops
