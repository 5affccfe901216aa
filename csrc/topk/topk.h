// Top-k pseudo-label extraction: declarations shared by the CPU and CUDA kernels.
//
// For each row of logits x[0..V) at temperature T, with y = x / T, one pass computes
//   indices  int32 [N, k]  the k largest y, best first, ties broken by the lower id
//   logprobs fp32  [N, k]  y - lse at those ids
//   lse      fp32  [N]     log sum exp(y); +inf if the row holds +inf; NaN if it holds NaN
//   margin   fp32  [N]     p_(1) - p_(2), where p = exp(logprob) (p_(1) when V = 1)
//   residual fp32  [N]     max(0, 1 - sum_j p_j)
// Rows with c > 0 entries equal to +inf follow the softmax limit: those entries get logprob -log c,
// all others -inf. The Python wrapper raises on rows whose lse is NaN or -inf.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <tuple>

// float32 / float16 / bfloat16 only (no float64 instantiation: the checks refuse it).
#define CLINKD_DISPATCH_LOGITS(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace clinkd {

constexpr int64_t kMaxTopK = 1024;

using TopKResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Validates arguments (also when called from C++ directly, bypassing the Python checks).
void check_topk_args(const at::Tensor& logits, int64_t k, double temperature);

// Allocates the five outputs for N rows on the device of `logits`.
TopKResult allocate_topk_outputs(const at::Tensor& logits, int64_t k);

TopKResult topk_pseudo_labels_cpu(const at::Tensor& logits, int64_t k, double temperature);
#ifdef CLINKD_WITH_CUDA
TopKResult topk_pseudo_labels_cuda(const at::Tensor& logits, int64_t k, double temperature);
#endif

}  // namespace clinkd
