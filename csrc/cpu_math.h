// Vectorisable fp32 math shared by the C++ CPU kernels (top-k extraction, distillation-loss rows).
#pragma once

#include <cstdint>
#include <cstring>

namespace clinkd {

// exp(x) for x <= 0 to about 1 ulp, written so that the compiler vectorises loops that call it
// (libm's expf does not vectorise without -ffast-math). Returns 0 below -87 (and for -inf).
inline float exp_nonpositive(float x) {
  const float xc = x > -87.0f ? x : -87.0f;
  const float r = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const float g = (xc - r * 0.693145751953125f) - r * 1.428606765330187e-06f;  // x - r ln 2, |g| <= ln2/2
  float p = 1.0f / 5040.0f;  // Taylor to degree 7: truncation below 6e-9 relative on |g| <= ln2/2
  p = p * g + 1.0f / 720.0f;
  p = p * g + 1.0f / 120.0f;
  p = p * g + 1.0f / 24.0f;
  p = p * g + 1.0f / 6.0f;
  p = p * g + 0.5f;
  p = p * g + 1.0f;
  p = p * g + 1.0f;
  const int32_t bits = (static_cast<int32_t>(r) + 127) << 23;  // 2^r, r in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

}  // namespace clinkd

// The hot loops of the CPU kernels are also compiled for AVX2+FMA on x86-64, and the loader picks that
// version on CPUs that have it (the portable build is SSE2).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLINKD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLINKD_CPU_CLONES
#endif
