// CUDA kernels of the `moe_ops` library (schemas and CPU kernels: moe_ops.cpp). The per-element
// arithmetic is the one of moe_index.h, which the CPU tests exercise.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "moe_checks.h"
#include "moe_index.h"

namespace moe_ops {

namespace {

constexpr int kThreads = 256;

inline int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

// Ranks of slots within their group, in priority order: one thread per group walks the queue,
// so the order within a group is the priority order (stable), as on the CPU. O(G * S) work,
// simple and exact; G is small (experts or modalities).
__global__ void rank_kernel(const int64_t* ids, const int64_t* priority, int64_t S,
                            int64_t num_groups, int64_t* rank, int64_t* seen) {
  const int64_t g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= num_groups) return;
  int64_t r = 0;
  for (int64_t i = 0; i < S; ++i) {
    const int64_t s = priority != nullptr ? priority[i] : i;
    if (ids[s] == g) rank[s] = r++;
  }
  seen[g] = r;
}

// Group starts and every slot's row; one thread, O(G + S): dropped slots keep slot order.
__global__ void place_kernel(const int64_t* ids, const int64_t* rank, const int64_t* seen,
                             int64_t S, int64_t num_groups, int64_t capacity, int64_t* counts,
                             int64_t* start, int64_t* order, int64_t* inverse) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  place_slots(ids, rank, seen, S, num_groups, capacity, counts, start, order, inverse);
}

template <typename scalar_t>
__global__ void permute_kernel(const scalar_t* x, const int64_t* order, const float* w,
                               scalar_t* out, int64_t R, int64_t D, int64_t k, int64_t kept) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= R * D) return;
  out[i] = permute_value<scalar_t, acc_t>(x, order, w, k, kept, i / D, i % D, D);
}

template <typename scalar_t>
__global__ void unpermute_kernel(const scalar_t* y, const int64_t* inverse, const float* w,
                                 scalar_t* out, int64_t N, int64_t D, int64_t k, int64_t kept) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= N * D) return;
  out[i] = unpermute_value<scalar_t, acc_t>(y, inverse, w, k, kept, i / D, i % D, D);
}

template <typename scalar_t>
__global__ void slot_dots_kernel(const scalar_t* a, const scalar_t* b, const int64_t* inverse,
                                 float* out, int64_t S, int64_t D, int64_t k, int64_t kept) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (s >= S) return;
  out[s] = static_cast<float>(slot_dot<scalar_t, acc_t>(a, b, inverse, k, kept, s, D));
}


}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_by_group_cuda(const at::Tensor& ids,
                                                                  const at::Tensor& priority,
                                                                  int64_t num_groups,
                                                                  int64_t capacity) {
  check_index(ids, "ids");
  TORCH_CHECK(num_groups > 0, "num_groups must be positive");
  const c10::cuda::CUDAGuard guard(ids.device());
  const int64_t S = ids.numel();
  const bool ordered = priority.numel() > 0;
  TORCH_CHECK(!ordered || priority.numel() == S, "priority must list every slot once");
  // ids out of range would go unranked: check on the device before sorting
  TORCH_CHECK(S == 0 || (ids.min().item<int64_t>() >= 0 && ids.max().item<int64_t>() < num_groups),
              "group ids out of range [0, ", num_groups, ")");
  auto order = at::empty({S}, ids.options());
  auto inverse = at::empty({S}, ids.options());
  auto counts = at::empty({num_groups}, ids.options());
  auto rank = at::empty({S}, ids.options());
  auto seen = at::empty({num_groups}, ids.options());
  auto start = at::empty({num_groups}, ids.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  rank_kernel<<<blocks_for(num_groups), kThreads, 0, stream>>>(
      ids.data_ptr<int64_t>(), ordered ? priority.data_ptr<int64_t>() : nullptr, S, num_groups,
      rank.data_ptr<int64_t>(), seen.data_ptr<int64_t>());
  place_kernel<<<1, 1, 0, stream>>>(ids.data_ptr<int64_t>(), rank.data_ptr<int64_t>(),
                                    seen.data_ptr<int64_t>(), S, num_groups, capacity,
                                    counts.data_ptr<int64_t>(), start.data_ptr<int64_t>(),
                                    order.data_ptr<int64_t>(), inverse.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {order, inverse, counts};
}

at::Tensor permute_rows_cuda(const at::Tensor& x, const at::Tensor& order,
                             const at::Tensor& inverse, const std::optional<at::Tensor>& weights,
                             int64_t k, int64_t kept) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t R = order.numel(), S = inverse.numel(), D = x.size(1);
  auto out = at::empty({R, D}, x.options());
  if (R * D == 0) return out;
  const float* w = weights_ptr(weights, S);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "permute_rows", [&] {
    permute_kernel<scalar_t><<<blocks_for(R * D), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), w, out.data_ptr<scalar_t>(), R, D, k,
        kept);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unpermute_rows_cuda(const at::Tensor& y, const at::Tensor& order,
                               const at::Tensor& inverse, const std::optional<at::Tensor>& weights,
                               int64_t k, int64_t kept) {
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous(), "y must be a contiguous 2-D tensor");
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t S = inverse.numel(), N = S / k, D = y.size(1);
  auto out = at::empty({N, D}, y.options());
  if (N * D == 0) return out;
  const float* w = weights_ptr(weights, S);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_rows",
                                  [&] {
    unpermute_kernel<scalar_t><<<blocks_for(N * D), kThreads, 0, stream>>>(
        y.data_ptr<scalar_t>(), inverse.data_ptr<int64_t>(), w, out.data_ptr<scalar_t>(), N, D,
        k, kept);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor slot_dots_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& order,
                          const at::Tensor& inverse, int64_t k, int64_t kept) {
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "a and b must be contiguous");
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t S = inverse.numel();
  auto out = at::empty({S}, a.options().dtype(at::kFloat));
  if (S == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "slot_dots", [&] {
    slot_dots_kernel<scalar_t><<<blocks_for(S), kThreads, 0, stream>>>(
        a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), inverse.data_ptr<int64_t>(),
        out.data_ptr<float>(), S, b.size(1), k, kept);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The weighted unpermute's backward as two launches over the same index logic (the CPU kernel
// does both in one pass over the rows).
std::tuple<at::Tensor, at::Tensor> unpermute_rows_backward_cuda(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& order,
    const at::Tensor& inverse, const at::Tensor& weights, int64_t k, int64_t kept) {
  TORCH_CHECK(y.size(0) >= kept && y.size(0) <= order.numel(), "y must have between kept (",
              kept, ") and order's (", order.numel(), ") rows");
  auto grad_y = permute_rows_cuda(grad, order, inverse, weights, k, kept).narrow(0, 0, y.size(0));
  auto grad_w = slot_dots_cuda(grad, y, order, inverse, k, kept);
  return {grad_y, grad_w};
}

TORCH_LIBRARY_IMPL(moe_ops, CUDA, m) {
  m.impl("sort_by_group", &sort_by_group_cuda);
  m.impl("permute_rows", &permute_rows_cuda);
  m.impl("unpermute_rows", &unpermute_rows_cuda);
  m.impl("slot_dots", &slot_dots_cuda);
  m.impl("unpermute_rows_backward", &unpermute_rows_backward_cuda);
}

}  // namespace moe_ops
