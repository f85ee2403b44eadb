// Host-side argument checks shared by the CPU (moe_ops.cpp) and CUDA (moe_ops_cuda.cu) kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace moe_ops {

inline void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, " must be a contiguous 1-D tensor");
}

// The combine weights as a float32 pointer, or nullptr when there are none.
inline const float* weights_ptr(const std::optional<at::Tensor>& w, int64_t S) {
  if (!w.has_value()) return nullptr;
  TORCH_CHECK(w->scalar_type() == at::kFloat && w->is_contiguous() && w->numel() == S,
              "weights must be a contiguous float32 tensor of ", S, " elements");
  return w->data_ptr<float>();
}

}  // namespace moe_ops
