// The token-choice router in one pass per token (CPU): scores, top-k experts and their weights.
//
//   router_topk(logits (N, E), bias (E,)?, k, renormalize, sigmoid)
//       -> scores (N, E) float32   softmax (or sigmoid) of the logits
//          expert (N, k) int64     the k highest of scores + bias, highest first
//          weight (N, k) float32   the unbiased scores of those experts, renormalised to sum 1
//                                  (the sum clamped at 1e-20) when `renormalize`
//          lse (N,) float32        logsumexp of each token's logits (the z-loss's term)
//          prob_sum (E,) float32   the sum over tokens of the routing probabilities: the scores
//                                  (softmax), or each row of scores over its sum clamped at
//                                  1e-20 (sigmoid); the balancing loss's P times N
//          entropy () float32      the sum over tokens of those probabilities' entropy
//   router_topk_backward(grad_scores?, grad_weight?, grad_lse?, grad_prob_sum?, scores, expert,
//                        renormalize, sigmoid)
//       -> grad_logits (N, E) float32 (grad_lse only with softmax scores: d lse = the scores)
//
// The sums run over fixed blocks of rows added in block order, so they do not depend on the
// thread count (runs resume bit for bit).
//
// With E of 8-64 experts, torch's softmax and topk over (N, E) cost 100-200 us each on two
// cores, several times the work; here one loop over the tokens does all of it. The reference is
// `moe.routing.router_scores` + `topk_route`; fake kernel in moe/fused.py, autograd in
// csrc/autograd.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "moe_rows_cpu.h"  // MOE_CLONES, exp_f32

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace moe_ops {
namespace {

constexpr float kMinSum = 1e-20f;  // the clamp of the renormalising sum, as in the reference

// a ranks above b: larger, or NaN against a number (torch.topk's order)
inline bool above(float a, float b) { return a > b || (a != a && b == b); }

// Indices of the k largest select[e], highest first (ties: the lower index first), into out:
// one pass, each value inserted into the sorted list of the best so far.
inline void top_k(const float* select, int64_t E, int64_t k, int64_t* out) {
  int64_t n = 0;
  for (int64_t e = 0; e < E; ++e) {
    const float v = select[e];
    if (n == k && !above(v, select[out[k - 1]])) continue;
    int64_t i = n < k ? n++ : k - 1;
    for (; i > 0 && above(v, select[out[i - 1]]); --i) out[i] = out[i - 1];
    out[i] = e;
  }
}

constexpr int64_t kRowBlock = 512;  // rows per block of the sums

// exp(x) in place for x <= 0 (logits minus their row's maximum): `rows::exp_f32`, and 0 below
// -87 (where exp leaves float's normal range). The loop vectorises (libm's expf, one value at a
// time, took most of the router's time).
MOE_CLONES static void exp_nonpositive(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] < -87.f ? 0.f : rows::exp_f32(x[i]);
}

// entr(p) = -p log p, 0 at p = 0 (torch.special.entr)
inline float entr(float p) { return p > 0.f ? -p * std::log(p) : (p == 0.f ? 0.f : -INFINITY); }

// Rows [r0, r1): scores, choices, weights and lse; adds the rows' probabilities into prob_sum
// (E) and their entropy into *entropy.
template <typename T>
void router_rows(const T* logits, const float* bias, float* scores, int64_t* expert,
                 float* weight, float* lse, float* prob_sum, float* entropy, int64_t r0,
                 int64_t r1, int64_t E, int64_t k, bool renormalize, bool sigmoid) {
  std::vector<float> select(bias == nullptr ? 0 : E), row_max(sigmoid ? 0 : r1 - r0);
  if (!sigmoid) {  // the block's exponentials in one vectorised pass
    for (int64_t r = r0; r < r1; ++r) {
      const T* l = logits + r * E;
      float m = -INFINITY;
      for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<float>(l[e]));
      row_max[r - r0] = m;
      for (int64_t e = 0; e < E; ++e) scores[r * E + e] = static_cast<float>(l[e]) - m;
    }
    exp_nonpositive(scores + r0 * E, (r1 - r0) * E);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* l = logits + r * E;
    float* s = scores + r * E;
    float m = -INFINITY;
    if (sigmoid) {
      for (int64_t e = 0; e < E; ++e) m = std::max(m, static_cast<float>(l[e]));
      float sum = 0.f, total = 0.f;
      for (int64_t e = 0; e < E; ++e) {
        s[e] = 1.f / (1.f + std::exp(-static_cast<float>(l[e])));
        sum += std::exp(static_cast<float>(l[e]) - m);
        total += s[e];
      }
      lse[r] = m + std::log(sum);
      const float inv = 1.f / std::max(total, kMinSum);
      for (int64_t e = 0; e < E; ++e) {
        prob_sum[e] += s[e] * inv;
        *entropy += entr(s[e] * inv);
      }
    } else {
      m = row_max[r - r0];
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += s[e];
      const float log_sum = std::log(sum);
      lse[r] = m + log_sum;
      // entropy = -sum p log p with log p = (l - m) - log_sum: log_sum - sum p (l - m)
      const float inv = 1.f / sum;
      float dot = 0.f;
      for (int64_t e = 0; e < E; ++e) {
        s[e] *= inv;
        prob_sum[e] += s[e];
        if (s[e] > 0.f) dot += s[e] * (static_cast<float>(l[e]) - m);
      }
      *entropy += log_sum - dot;
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
router_topk_cpu(
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
  auto lse = at::empty({N}, opts.dtype(at::kFloat));
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  std::vector<float> block_probs(blocks * E, 0.f), block_entropy(blocks, 0.f);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "router_topk",
                                  [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    float* sp = scores.data_ptr<float>();
    int64_t* ep = expert.data_ptr<int64_t>();
    float* wp = weight.data_ptr<float>();
    float* lsep = lse.data_ptr<float>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        router_rows<scalar_t>(lp, b, sp, ep, wp, lsep, block_probs.data() + blk * E,
                              block_entropy.data() + blk, blk * kRowBlock,
                              std::min(N, (blk + 1) * kRowBlock), E, k, renormalize, sigmoid);
      }
    });
  });
  auto prob_sum = at::zeros({E}, opts.dtype(at::kFloat));
  auto entropy = at::zeros({}, opts.dtype(at::kFloat));
  float* pp = prob_sum.data_ptr<float>();
  float* hp = entropy.data_ptr<float>();
  for (int64_t blk = 0; blk < blocks; ++blk) {  // in block order: the same sums on any threads
    for (int64_t e = 0; e < E; ++e) pp[e] += block_probs[blk * E + e];
    *hp += block_entropy[blk];
  }
  return {scores, expert, weight, lse, prob_sum, entropy};
}

// A float32 gradient of the given shape, or nullptr when absent.
const float* grad_or_null(const std::optional<at::Tensor>& grad, at::IntArrayRef sizes,
                          const char* name) {
  if (!grad.has_value()) return nullptr;
  TORCH_CHECK(grad->sizes() == sizes && grad->is_contiguous() &&
                  grad->scalar_type() == at::kFloat,
              name, " must be a contiguous float32 tensor of shape ", sizes, ", got ",
              grad->sizes());
  return grad->data_ptr<float>();
}

at::Tensor router_topk_backward_cpu(const std::optional<at::Tensor>& grad_scores,
                                    const std::optional<at::Tensor>& grad_weight,
                                    const std::optional<at::Tensor>& grad_lse,
                                    const std::optional<at::Tensor>& grad_prob_sum,
                                    const at::Tensor& scores, const at::Tensor& expert,
                                    bool renormalize, bool sigmoid) {
  TORCH_CHECK(scores.dim() == 2 && scores.is_contiguous() && scores.scalar_type() == at::kFloat,
              "scores must be the forward's contiguous float32 (N, E) scores");
  const int64_t N = scores.size(0), E = scores.size(1), k = expert.size(1);
  TORCH_CHECK(expert.dim() == 2 && expert.size(0) == N && expert.is_contiguous() &&
                  expert.scalar_type() == at::kLong,
              "expert must be the forward's contiguous int64 (N, k) choices");
  const float* gs = grad_or_null(grad_scores, scores.sizes(), "grad_scores");
  const float* gw = grad_or_null(grad_weight, expert.sizes(), "grad_weight");
  const float* gl = grad_or_null(grad_lse, {N}, "grad_lse");
  const float* gp_sum = grad_or_null(grad_prob_sum, {E}, "grad_prob_sum");
  TORCH_CHECK(gl == nullptr || !sigmoid, "grad_lse is computed here for softmax scores only");
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
      if (gp_sum != nullptr && !sigmoid) {  // prob_sum = sum of the scores
        for (int64_t e = 0; e < E; ++e) g[e] += gp_sum[e];
      } else if (gp_sum != nullptr) {  // prob_sum = sum of s / max(sum(s), 1e-20)
        float total = 0.f, dot = 0.f;
        for (int64_t e = 0; e < E; ++e) {
          total += s[e];
          dot += gp_sum[e] * s[e];
        }
        const float denom = std::max(total, kMinSum);
        const float shift = total >= kMinSum ? dot / (denom * denom) : 0.f;
        for (int64_t e = 0; e < E; ++e) g[e] += gp_sum[e] / denom - shift;
      }
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
        // d lse / d logits = the softmax scores: grad_lse joins the shift
        float dot = gl == nullptr ? 0.f : -gl[r];
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
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("router_topk_backward(Tensor? grad_scores, Tensor? grad_weight, Tensor? grad_lse,"
        " Tensor? grad_prob_sum, Tensor scores, Tensor expert, bool renormalize, bool sigmoid)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_ops, CPU, m) {
  m.impl("router_topk", &router_topk_cpu);
  m.impl("router_topk_backward", &router_topk_backward_cpu);
}

}  // namespace moe_ops
