#include "topk.h"

#include <cmath>

namespace clinkd {

void check_topk_args(const at::Tensor& logits, int64_t k, double temperature) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D [N, V], got ", logits.dim(), "-D");
  const auto dt = logits.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                   "logits must be float32, float16 or bfloat16, got ", dt);
  const int64_t V = logits.size(1);
  TORCH_CHECK_VALUE(V >= 1, "logits must have at least one column (V >= 1), got ", V);
  TORCH_CHECK_VALUE(k >= 1 && k <= std::min<int64_t>(V, kMaxTopK), "k must be in [1, min(V, ", kMaxTopK,
                    ")] = [1, ", std::min<int64_t>(V, kMaxTopK), "], got ", k);
  // The Python op allows [1e-6, 1e6]: z / T must stay an ordinary fp32 number (kernels divide in fp32).
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature >= 1e-6 && temperature <= 1e6,
                    "temperature must be in [1e-6, 1e6], got ", temperature);
  TORCH_CHECK_VALUE(logits.size(0) == 0 || V == 1 || logits.stride(1) == 1,
                    "logits must have unit stride along the vocabulary, got stride ", logits.stride(1));
  TORCH_CHECK_VALUE(V < (int64_t(1) << 31), "V must be < 2^31 for int32 indices, got ", V);
}

TopKResult allocate_topk_outputs(const at::Tensor& logits, int64_t k) {
  const int64_t N = logits.size(0);
  auto f32 = logits.options().dtype(at::kFloat);
  return {at::empty({N, k}, logits.options().dtype(at::kInt)), at::empty({N, k}, f32), at::empty({N}, f32),
          at::empty({N}, f32), at::empty({N}, f32)};
}

}  // namespace clinkd
