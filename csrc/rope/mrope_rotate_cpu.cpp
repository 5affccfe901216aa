// CPU kernel of the M-RoPE rotation (mrope_rotate.h).
//
// The PyTorch path it replaces ran about thirty multi-threaded elementwise ops per call; on a machine
// shared with other work each op's fork/join waits for a core the scheduler gave away, and the call took
// 20-30x its quiet time. Here a call is one at::parallel_for over the tokens: per token the D/2 angles
// (fp32 products, then cosf/sinf), then each head's two halves rotated by one vectorisable loop.
#include "mrope_rotate.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../cpu_math.h"

namespace clinkd {
namespace {

// o1 = x1·c − x2·s, o2 = x2·c + x1·s over one head's halves (fp32 in and out).
CLINKD_CPU_CLONES void rotate_f32(const float* x, float* o, const float* c, const float* s, int64_t half) {
  _Pragma("omp simd") for (int64_t j = 0; j < half; ++j) {
    const float x1 = x[j], x2 = x[j + half];
    o[j] = x1 * c[j] - x2 * s[j];
    o[j + half] = x2 * c[j] + x1 * s[j];
  }
}

template <typename scalar_t>
void rotate_head(const scalar_t* x, scalar_t* o, const float* c, const float* s, int64_t half, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    rotate_f32(x, o, c, s, half);
  } else {  // fp16 / bf16: through an fp32 copy of the head (the rotation in fp32, as the other paths)
    for (int64_t j = 0; j < 2 * half; ++j) buf[j] = static_cast<float>(x[j]);
    rotate_f32(buf, buf + 2 * half, c, s, half);
    for (int64_t j = 0; j < 2 * half; ++j) o[j] = static_cast<scalar_t>(buf[2 * half + j]);
  }
}

void check(const at::Tensor& x, const at::Tensor& out, const char* name, int64_t B, int64_t S, int64_t D) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(0) == B && x.size(1) == S && x.size(3) == D, name,
                    " must have shape [", B, ", ", S, ", H, ", D, "], got ", x.sizes());
  TORCH_CHECK_VALUE(x.numel() == 0 || x.stride(3) == 1, name, " must have unit stride along D");
  TORCH_CHECK_VALUE(out.sizes() == x.sizes() && out.is_contiguous() && out.scalar_type() == x.scalar_type(), name,
                    "_out must be a contiguous tensor of the shape and dtype of ", name);
  TORCH_CHECK_VALUE(x.device().is_cpu() && out.device().is_cpu(), name, " must be a CPU tensor");
}

}  // namespace

void mrope_rotate_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out, const at::Tensor& k_out,
                      const at::Tensor& position_ids, const at::Tensor& inv_freq, const at::Tensor& axis, double scale,
                      bool inverse) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be 4-D [B, S, Hq, D], got ", q.dim(), "-D");
  const int64_t B = q.size(0), S = q.size(1), Hq = q.size(2), D = q.size(3), half = D / 2;
  TORCH_CHECK_VALUE(D % 2 == 0 && D >= 2 && D <= 256, "head dim must be even and in [2, 256], got ", D);
  check(q, q_out, "q", B, S, D);
  check(k, k_out, "k", B, S, D);
  const int64_t Hkv = k.size(2);
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type(), "q and k must have one dtype");
  TORCH_CHECK_VALUE(position_ids.dim() == 3 && position_ids.size(0) == 3 && position_ids.size(1) == B &&
                        position_ids.size(2) == S,
                    "position_ids must have shape [3, ", B, ", ", S, "], got ", position_ids.sizes());
  TORCH_CHECK_TYPE(position_ids.scalar_type() == at::kLong || position_ids.scalar_type() == at::kInt,
                   "position_ids must be int64 or int32");
  TORCH_CHECK_VALUE(inv_freq.dim() == 1 && inv_freq.size(0) == half && inv_freq.scalar_type() == at::kFloat &&
                        inv_freq.is_contiguous(),
                    "inv_freq must be a contiguous float32 [", half, "], got ", inv_freq.sizes());
  TORCH_CHECK_VALUE(axis.dim() == 1 && axis.size(0) == half && axis.scalar_type() == at::kInt && axis.is_contiguous(),
                    "axis must be a contiguous int32 [", half, "]");
  TORCH_CHECK_VALUE(position_ids.device().is_cpu() && inv_freq.device().is_cpu() && axis.device().is_cpu(),
                    "position_ids, inv_freq and axis must be CPU tensors");
  const int32_t* ax = axis.const_data_ptr<int32_t>();
  for (int64_t j = 0; j < half; ++j) {
    TORCH_CHECK_VALUE(ax[j] >= 0 && ax[j] <= 2, "axis[", j, "] = ", ax[j], " is not a position row (0, 1, 2)");
  }
  const int64_t tokens = B * S;
  if (tokens == 0) return;
  const float* f = inv_freq.const_data_ptr<float>();
  const float sc = static_cast<float>(scale), ss = static_cast<float>(inverse ? -scale : scale);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, (Hq + Hkv) * D));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mrope_rotate_cpu", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    scalar_t* qo = q_out.data_ptr<scalar_t>();
    scalar_t* ko = k_out.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> c(half), s(half), buf(4 * half);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / S, i = t % S;
        float p[3];
        for (int a = 0; a < 3; ++a) {
          const int64_t off = a * position_ids.stride(0) + b * position_ids.stride(1) + i * position_ids.stride(2);
          p[a] = position_ids.scalar_type() == at::kLong
                     ? static_cast<float>(position_ids.const_data_ptr<int64_t>()[off])
                     : static_cast<float>(position_ids.const_data_ptr<int32_t>()[off]);
        }
        for (int64_t j = 0; j < half; ++j) {
          const float theta = p[ax[j]] * f[j];  // the fp32 product, as every path computes it
          c[j] = std::cos(theta) * sc;
          s[j] = std::sin(theta) * ss;
        }
        for (int64_t h = 0; h < Hq; ++h) {
          rotate_head<scalar_t>(qp + b * q.stride(0) + i * q.stride(1) + h * q.stride(2), qo + (t * Hq + h) * D,
                                c.data(), s.data(), half, buf.data());
        }
        for (int64_t h = 0; h < Hkv; ++h) {
          rotate_head<scalar_t>(kp + b * k.stride(0) + i * k.stride(1) + h * k.stride(2), ko + (t * Hkv + h) * D,
                                c.data(), s.data(), half, buf.data());
        }
      }
    });
  });
}

}  // namespace clinkd
