// The token-choice router in one pass per token (CPU): scores, top-k experts and their weights.
//
//   router_topk(logits (N, E), bias (E,)?, k, renormalize, sigmoid)
//       -> scores (N, E) float32   softmax (or sigmoid) of the logits
//          expert (N, k) int64     the k highest of scores + bias, highest first
//          weight (N, k) float32   the unbiased scores of those experts, renormalised to sum 1
//                                  (the sum clamped at 1e-20) when `renormalize`
//   router_topk_backward(grad_scores?, grad_weight?, scores, expert, renormalize, sigmoid)
//       -> grad_logits (N, E) float32
//
// With E of 8-64 experts, torch's softmax and topk over (N, E) cost 100-200 us each on two
// cores, several times the work; here one loop over the tokens does all of it. The reference is
// `moe.routing.router_scores` + `topk_route`; fake kernel and autograd in moe/fused.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>

namespace moe_ops {
namespace {

constexpr float kMinSum = 1e-20f;  // the clamp of the renormalising sum, as in the reference

// Indices of the k largest select[e] (ties: the lower index first), into out.
inline void top_k(const float* select, int64_t E, int64_t k, int64_t* out) {
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken |= out[i] == e;
      if (!taken && (best < 0 || select[e] > select[best] ||
                     (std::isnan(select[e]) && !std::isnan(select[best])))) {
        best = e;
      }
    }
    out[j] = best;
  }
}

template <typename T>
void router_rows(const T* logits, const float* bias, float* scores, int64_t* expert,
                 float* weight, int64_t r0, int64_t r1, int64_t E, int64_t k, bool renormalize,
                 bool sigmoid) {
  std::vector<float> select(bias == nullptr ? 0 : E);
  for (int64_t r = r0; r < r1; ++r) {
    const T* l = logits + r * E;
    float* s = scores + r * E;
    if (sigmoid) {
      for (int64_t e = 0; e < E; ++e) s[e] = 1.f / (1.f + std::exp(-static_cast<float>(l[e])));
    } else {
      float m = -INFINITY;
      for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<float>(l[e]));
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) {
        s[e] = std::exp(static_cast<float>(l[e]) - m);
        sum += s[e];
      }
      const float inv = 1.f / sum;
      for (int64_t e = 0; e < E; ++e) s[e] *= inv;
    }
    const float* sel = s;
    if (bias != nullptr) {
      for (int64_t e = 0; e < E; ++e) select[e] = s[e] + bias[e];
      sel = select.data();
    }
    int64_t* ex = expert + r * k;
    float* w = weight + r * k;
    top_k(sel, E, k, ex);
    float total = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      w[j] = s[ex[j]];
      total += w[j];
    }
    if (renormalize) {
      const float denom = std::max(total, kMinSum);
      for (int64_t j = 0; j < k; ++j) w[j] /= denom;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_topk_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t k, bool renormalize,
    bool sigmoid) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "logits must be a contiguous (N, E) "
              "tensor");
  const int64_t N = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "k must be in [1, ", E, "], got ", k);
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == E,
                "bias must be a contiguous float32 tensor of ", E, " values");
    b = bias->data_ptr<float>();
  }
  auto opts = logits.options();
  auto scores = at::empty({N, E}, opts.dtype(at::kFloat));
  auto expert = at::empty({N, k}, opts.dtype(at::kLong));
  auto weight = at::empty({N, k}, opts.dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "router_topk",
                                  [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    float* sp = scores.data_ptr<float>();
    int64_t* ep = expert.data_ptr<int64_t>();
    float* wp = weight.data_ptr<float>();
    at::parallel_for(0, N, 512, [&](int64_t r0, int64_t r1) {
      router_rows<scalar_t>(lp, b, sp, ep, wp, r0, r1, E, k, renormalize, sigmoid);
    });
  });
  return {scores, expert, weight};
}

at::Tensor router_topk_backward_cpu(const std::optional<at::Tensor>& grad_scores,
                                    const std::optional<at::Tensor>& grad_weight,
                                    const at::Tensor& scores, const at::Tensor& expert,
                                    bool renormalize, bool sigmoid) {
  TORCH_CHECK(scores.dim() == 2 && scores.is_contiguous() && scores.scalar_type() == at::kFloat,
              "scores must be the forward's contiguous float32 (N, E) scores");
  const int64_t N = scores.size(0), E = scores.size(1), k = expert.size(1);
  TORCH_CHECK(expert.dim() == 2 && expert.size(0) == N && expert.is_contiguous() &&
                  expert.scalar_type() == at::kLong,
              "expert must be the forward's contiguous int64 (N, k) choices");
  const float* gs = nullptr;
  const float* gw = nullptr;
  if (grad_scores.has_value()) {
    TORCH_CHECK(grad_scores->sizes() == scores.sizes() && grad_scores->is_contiguous() &&
                    grad_scores->scalar_type() == at::kFloat,
                "grad_scores must be contiguous float32 like scores");
    gs = grad_scores->data_ptr<float>();
  }
  if (grad_weight.has_value()) {
    TORCH_CHECK(grad_weight->sizes() == expert.sizes() && grad_weight->is_contiguous() &&
                    grad_weight->scalar_type() == at::kFloat,
                "grad_weight must be contiguous float32 like the weights");
    gw = grad_weight->data_ptr<float>();
  }
  auto grad = at::empty({N, E}, scores.options());
  const float* sp = scores.data_ptr<float>();
  const int64_t* ep = expert.data_ptr<int64_t>();
  float* gp = grad.data_ptr<float>();
  at::parallel_for(0, N, 512, [&](int64_t r0, int64_t r1) {
    std::vector<float> g(E);
    for (int64_t r = r0; r < r1; ++r) {
      const float* s = sp + r * E;
      const int64_t* ex = ep + r * k;
      for (int64_t e = 0; e < E; ++e) g[e] = gs == nullptr ? 0.f : gs[r * E + e];
      if (gw != nullptr) {
        const float* gwr = gw + r * k;
        float total = 0.f;
        for (int64_t j = 0; j < k; ++j) total += s[ex[j]];
        if (!renormalize) {
          for (int64_t j = 0; j < k; ++j) g[ex[j]] += gwr[j];
        } else if (total >= kMinSum) {  // w_j = s_j / total
          float dot = 0.f;
          for (int64_t j = 0; j < k; ++j) dot += gwr[j] * s[ex[j]];
          dot /= total;
          for (int64_t j = 0; j < k; ++j) g[ex[j]] += (gwr[j] - dot) / total;
        } else {  // the sum was clamped: w_j = s_j / 1e-20
          for (int64_t j = 0; j < k; ++j) g[ex[j]] += gwr[j] / kMinSum;
        }
      }
      float* out = gp + r * E;
      if (sigmoid) {
        for (int64_t e = 0; e < E; ++e) out[e] = g[e] * s[e] * (1.f - s[e]);
      } else {
        float dot = 0.f;
        for (int64_t e = 0; e < E; ++e) dot += g[e] * s[e];
        for (int64_t e = 0; e < E; ++e) out[e] = s[e] * (g[e] - dot);
      }
    }
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_ops, m) {
  m.def("router_topk(Tensor logits, Tensor? bias, int k, bool renormalize, bool sigmoid)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("router_topk_backward(Tensor? grad_scores, Tensor? grad_weight, Tensor scores,"
        " Tensor expert, bool renormalize, bool sigmoid) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_ops, CPU, m) {
  m.impl("router_topk", &router_topk_cpu);
  m.impl("router_topk_backward", &router_topk_backward_cpu);
}

}  // namespace moe_ops
