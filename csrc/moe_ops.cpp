// CPU kernels of the grouping primitive, and the schemas of the `moe_ops` library.
//
//   sort_by_group(ids, priority, num_groups, capacity) -> (order, inverse, counts)
//   permute_rows(x, order, inverse, weights?, k, kept)   -> (R, D) rows grouped by group
//   unpermute_rows(y, order, inverse, weights?, k, kept) -> (N, D) weighted sums per token
//   slot_dots(a, b, order, inverse, k, kept)             -> (S,) float32, for weight gradients
//   unpermute_rows_backward(grad, y, order, inverse, weights, k, kept)
//       -> (permute_rows(grad, order, inverse, weights, k, kept)[:y rows],
//           slot_dots(grad, y, order, inverse, k, kept))   in one pass over the rows
//
// S = inverse.numel() slots of N = S / k tokens; R = order.numel() rows, S of them from
// sort_by_group, or more in a padded layout whose empty rows have order -1 (moe/ops.py).
//
// Autograd and fake (meta) kernels are registered from Python (moe/ops.py), once for every
// device. The per-element arithmetic lives in moe_index.h, shared with the CUDA kernels.
#include <Python.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstring>
#include <vector>

#include "moe_checks.h"
#include "moe_index.h"
#include "moe_rows_cpu.h"

namespace moe_ops {


std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_by_group_cpu(const at::Tensor& ids,
                                                                 const at::Tensor& priority,
                                                                 int64_t num_groups,
                                                                 int64_t capacity) {
  check_index(ids, "ids");
  TORCH_CHECK(num_groups > 0, "num_groups must be positive");
  const int64_t S = ids.numel();
  const bool ordered = priority.numel() > 0;
  if (ordered) {
    check_index(priority, "priority");
    TORCH_CHECK(priority.numel() == S, "priority must list every slot once");
  }
  auto order = at::empty({S}, ids.options());
  auto inverse = at::empty({S}, ids.options());
  auto counts = at::zeros({num_groups}, ids.options());
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* pri = ordered ? priority.data_ptr<int64_t>() : nullptr;
  int64_t* ord = order.data_ptr<int64_t>();
  int64_t* inv = inverse.data_ptr<int64_t>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  // 1. rank of each slot within its group, in priority order (a stable counting sort)
  std::vector<int64_t> rank(S), seen(num_groups, 0);
  for (int64_t i = 0; i < S; ++i) {
    const int64_t s = ordered ? pri[i] : i;
    TORCH_CHECK(s >= 0 && s < S, "priority must be a permutation of [0, ", S, ")");
    const int64_t g = id[s];
    TORCH_CHECK(g >= 0 && g < num_groups, "group id ", g, " out of range [0, ", num_groups, ")");
    rank[s] = seen[g]++;
  }
  // 2 and 3. group starts, then every slot's row (shared with the CUDA kernel)
  std::vector<int64_t> start(num_groups);
  place_slots(id, rank.data(), seen.data(), S, num_groups, capacity, cnt, start.data(), ord, inv);
  return {order, inverse, counts};
}

// The CPU loops work row by row: the index arithmetic (moe_index.h) once per row, then the
// vectorised row loops of moe_rows_cpu.h.
//
// out[row] = x[token] * w[slot] for the slot of each row (zeros for dropped and padding rows);
// with `other`, also dots[slot] = <x[token], other[row]> from the same read of x[token] (the
// weighted unpermute's backward: row and weight gradients in one pass). The token rows are read
// in the routing's order: each is asked for kAhead rows before it is read (prefetch_row).
template <typename scalar_t>
void permute_kernel(const scalar_t* x, const int64_t* order, const float* w, scalar_t* out,
                    int64_t R, int64_t D, int64_t k, int64_t kept,
                    const scalar_t* other = nullptr, float* dots = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t row = 0; row < R; ++row) {
    scalar_t* dst = out + row * D;
    if (row + rows::kAhead < R) {  // the token row read kAhead rows later (moe_rows_cpu.h)
      const int64_t next = row_slot(order, kept, row + rows::kAhead);
      if (next >= 0) rows::prefetch_row(x + token_of_slot(next, k) * D, D * sizeof(scalar_t));
    }
    const int64_t slot = row_slot(order, kept, row);
    if (slot < 0) {
      std::memset(static_cast<void*>(dst), 0, D * sizeof(scalar_t));
      continue;
    }
    const scalar_t* src = x + token_of_slot(slot, k) * D;
    if (other != nullptr) {
      dots[slot] = static_cast<float>(rows::scale_dot<scalar_t, acc_t>(
          src, static_cast<acc_t>(w[slot]), dst, other + row * D, D));
    } else if (w == nullptr) {
      std::memcpy(static_cast<void*>(dst), src, D * sizeof(scalar_t));
    } else {
      rows::scale<scalar_t, acc_t>(src, static_cast<acc_t>(w[slot]), dst, D);
    }
  }
}

// out[token] = the sum of its kept slots' rows times their weights (zeros where none is kept):
// top-1 and top-2 tokens with every slot kept in one pass (a scaled copy, or `combine2` reading
// both rows at once), others summed row by row in acc_t. Measured on one thread, two rows per
// token: 0.62-0.72 of the time of the row-by-row sum at bench moe's size, 0.74-0.82 at bench
// ops' (README, Benchmarks).
template <typename scalar_t>
void unpermute_kernel(const scalar_t* y, const int64_t* inverse, const float* w, scalar_t* out,
                      int64_t N, int64_t D, int64_t k, int64_t kept) {
  using acc_t = at::opmath_type<scalar_t>;
  auto scale_of = [w](int64_t slot) {
    return w == nullptr ? acc_t(1) : static_cast<acc_t>(w[slot]);
  };
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<acc_t> acc(D);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N; ++t) {
      scalar_t* dst = out + t * D;
      if (t + rows::kAhead < N) {
        for (int64_t j = 0; j < k; ++j) {
          const int64_t next = slot_row(inverse, kept, (t + rows::kAhead) * k + j);
          if (next >= 0) rows::prefetch_row(y + next * D, D * sizeof(scalar_t));
        }
      }
      if (k <= 2) {  // top-1 and top-2 with every slot kept: one pass over the rows
        const int64_t r0 = slot_row(inverse, kept, t * k);
        const int64_t r1 = k == 2 ? slot_row(inverse, kept, t * k + 1) : 0;
        if (r0 >= 0 && r1 >= 0) {
          const scalar_t* a = y + r0 * D;
          if (k == 2) {
            rows::combine2<scalar_t, acc_t>(a, scale_of(t * 2), y + r1 * D, scale_of(t * 2 + 1),
                                            dst, D);
          } else if (w == nullptr) {
            std::memcpy(static_cast<void*>(dst), a, D * sizeof(scalar_t));
          } else {
            rows::scale<scalar_t, acc_t>(a, scale_of(t), dst, D);
          }
          continue;
        }
      }
      int64_t used = 0;  // else: each kept row accumulated in acc_t
      for (int64_t j = 0; j < k; ++j) {
        const int64_t slot = t * k + j;
        const int64_t row = slot_row(inverse, kept, slot);
        if (row < 0) continue;
        rows::accumulate<scalar_t, acc_t>(acc.data(), y + row * D, scale_of(slot), D, used++ == 0);
      }
      if (used == 0) {
        std::memset(static_cast<void*>(dst), 0, D * sizeof(scalar_t));
      } else {
        rows::store<scalar_t, acc_t>(acc.data(), dst, D);
      }
    }
  }
}

template <typename scalar_t>
void slot_dots_kernel(const scalar_t* a, const scalar_t* b, const int64_t* inverse, float* out,
                      int64_t S, int64_t D, int64_t k, int64_t kept) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t s = 0; s < S; ++s) {
    const int64_t row = slot_row(inverse, kept, s);
    out[s] = row < 0 ? 0.f : static_cast<float>(rows::dot<scalar_t, acc_t>(
                                 a + token_of_slot(s, k) * D, b + row * D, D));
  }
}

void check_rows(const at::Tensor& x, const at::Tensor& order, const at::Tensor& inverse,
                int64_t k, int64_t kept) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "rows must be a contiguous 2-D tensor");
  check_index(order, "order");
  check_index(inverse, "inverse");
  TORCH_CHECK(k > 0 && inverse.numel() % k == 0, "k must divide the number of slots");
  TORCH_CHECK(kept >= 0 && kept <= order.numel(), "kept must be in [0, ", order.numel(), "]");
}

at::Tensor permute_rows_cpu(const at::Tensor& x, const at::Tensor& order,
                            const at::Tensor& inverse, const std::optional<at::Tensor>& weights,
                            int64_t k, int64_t kept) {
  check_rows(x, order, inverse, k, kept);
  const int64_t R = order.numel(), S = inverse.numel(), D = x.size(1);
  TORCH_CHECK(x.size(0) == S / k, "x must have one row per token (", S / k, ")");
  auto out = at::empty({R, D}, x.options());
  const float* w = weights_ptr(weights, S);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "permute_rows", [&] {
    permute_kernel<scalar_t>(x.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), w,
                             out.data_ptr<scalar_t>(), R, D, k, kept);
  });
  return out;
}

at::Tensor unpermute_rows_cpu(const at::Tensor& y, const at::Tensor& order,
                              const at::Tensor& inverse, const std::optional<at::Tensor>& weights,
                              int64_t k, int64_t kept) {
  check_rows(y, order, inverse, k, kept);
  const int64_t S = inverse.numel(), N = S / k, D = y.size(1);
  TORCH_CHECK(y.size(0) >= kept, "y must hold at least the ", kept, " kept rows");
  auto out = at::empty({N, D}, y.options());
  const float* w = weights_ptr(weights, S);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_rows",
                                  [&] {
    unpermute_kernel<scalar_t>(y.data_ptr<scalar_t>(), inverse.data_ptr<int64_t>(), w,
                               out.data_ptr<scalar_t>(), N, D, k, kept);
  });
  return out;
}

at::Tensor slot_dots_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& order,
                         const at::Tensor& inverse, int64_t k, int64_t kept) {
  check_rows(b, order, inverse, k, kept);
  const int64_t S = inverse.numel();
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous() && a.size(0) == S / k && a.size(1) == b.size(1)
                  && a.scalar_type() == b.scalar_type(),
              "a must be contiguous (", S / k, ", D) rows of b's dtype");
  auto out = at::empty({S}, a.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "slot_dots", [&] {
    slot_dots_kernel<scalar_t>(a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                               inverse.data_ptr<int64_t>(), out.data_ptr<float>(), S, b.size(1),
                               k, kept);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_rows_backward_cpu(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& order,
    const at::Tensor& inverse, const at::Tensor& weights, int64_t k, int64_t kept) {
  check_rows(y, order, inverse, k, kept);
  const int64_t S = inverse.numel(), R = y.size(0), D = y.size(1);
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous() && grad.size(0) == S / k &&
                  grad.size(1) == D && grad.scalar_type() == y.scalar_type(),
              "grad must be contiguous (", S / k, ", ", D, ") rows of y's dtype");
  TORCH_CHECK(R >= kept && R <= order.numel(), "y must have between kept (", kept,
              ") and order's (", order.numel(), ") rows");
  const float* w = weights_ptr(weights, S);
  auto grad_y = at::empty({R, D}, y.options());
  auto grad_w = at::zeros({S}, y.options().dtype(at::kFloat));  // dropped slots stay 0
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "unpermute_rows_backward", [&] {
    permute_kernel<scalar_t>(grad.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), w,
                             grad_y.data_ptr<scalar_t>(), R, D, k, kept, y.data_ptr<scalar_t>(),
                             grad_w.data_ptr<float>());
  });
  return {grad_y, grad_w};
}

TORCH_LIBRARY(moe_ops, m) {
  m.def("sort_by_group(Tensor ids, Tensor priority, int num_groups, int capacity)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("permute_rows(Tensor x, Tensor order, Tensor inverse, Tensor? weights, int k, int kept)"
        " -> Tensor");
  m.def("unpermute_rows(Tensor y, Tensor order, Tensor inverse, Tensor? weights, int k,"
        " int kept) -> Tensor");
  m.def("slot_dots(Tensor a, Tensor b, Tensor order, Tensor inverse, int k, int kept)"
        " -> Tensor");
  m.def("unpermute_rows_backward(Tensor grad, Tensor y, Tensor order, Tensor inverse,"
        " Tensor weights, int k, int kept) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moe_ops, CPU, m) {
  m.impl("sort_by_group", &sort_by_group_cpu);
  m.impl("permute_rows", &permute_rows_cpu);
  m.impl("unpermute_rows", &unpermute_rows_cpu);
  m.impl("slot_dots", &slot_dots_cpu);
  m.impl("unpermute_rows_backward", &unpermute_rows_backward_cpu);
}

}  // namespace moe_ops

// A Python module, so that `import moe._C` loads the library and runs the registrations.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
