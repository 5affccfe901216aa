// CUDA kernel for top-k pseudo-labels: one thread block per row, one read of the row.
//
// The block walks the row in tiles of kThreads * kItems values (coalesced: thread t reads ids
// t, t + kThreads, ...). Each value updates the thread's online log-sum-exp (max m, sum s), and is
// compared with the block's current threshold — the kk-th best entry kept so far (kk = max(k, 2)).
// Values that beat it are appended to a candidate list in shared memory. When the list could
// overflow during the next tile, the kept entries and the candidates are sorted together (bitonic
// sort in shared memory, best first: larger value, then lower id) and the best kk are kept, which
// raises the threshold. After the first few tiles the threshold is high and candidates are rare,
// so the merge costs little against the read of the row. No [N, V] temporary exists.
#include <ATen/Dispatch.h>
// c10's stream/guard headers, not ATen/cuda/CUDAContext.h: that one pulls in cuBLAS/cuSPARSE
// headers, which a minimal CUDA toolkit does not have and this kernel does not need.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cfloat>
#include <climits>

#include "topk.h"

namespace clinkd {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;
constexpr int kTile = kThreads * kItems;
constexpr int kCandidates = 2048;                  // candidate list capacity
constexpr int kSortCapacity = 4096;                // >= next_pow2(kMaxTopK + kCandidates)
static_assert(kCandidates >= kTile, "a tile must fit in an empty candidate list");

__device__ __forceinline__ bool better(float va, int ia, float vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

// Merges (m2, s2) into the log-sum-exp state (m, s); m = -inf means "empty".
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) { m = m2; s = s2; return; }
  const float mn = fmaxf(m, m2);
  s = s * expf(m - mn) + s2 * expf(m2 - mn);
  m = mn;
}

// Sorts vals/ids[0, n) in shared memory best first; n is a power of two.
__device__ void bitonic_sort_best_first(float* vals, int* ids, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < (n >> 1); t += blockDim.x) {
        const int i = 2 * t - (t & (stride - 1));
        const int j = i + stride;
        const bool best_first = (i & size) == 0;
        const bool swap = best_first ? better(vals[j], ids[j], vals[i], ids[i])
                                     : better(vals[i], ids[i], vals[j], ids[j]);
        if (swap) {
          const float v = vals[i]; vals[i] = vals[j]; vals[j] = v;
          const int x = ids[i]; ids[i] = ids[j]; ids[j] = x;
        }
      }
      __syncthreads();
    }
  }
}

// vals/ids[0, kp) hold the kept entries, [kp, kp + count) the candidates; keeps the best kp.
__device__ void merge_candidates(float* vals, int* ids, int kp, int count) {
  int n = 1;
  while (n < kp + count) n <<= 1;
  for (int i = kp + count + threadIdx.x; i < n; i += blockDim.x) {
    vals[i] = -INFINITY;
    ids[i] = INT_MAX;  // sentinel: loses every tie
  }
  __syncthreads();
  bitonic_sort_best_first(vals, ids, n);
}

template <typename T>
__device__ __forceinline__ T block_reduce_sum(T v, T* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) topk_pseudo_labels_kernel(
    const scalar_t* __restrict__ logits, int64_t row_stride, int V, int k, int kk, int kp, float temperature,
    int32_t* __restrict__ indices, float* __restrict__ logprobs, float* __restrict__ lse_out,
    float* __restrict__ margin_out, float* __restrict__ residual_out) {
  __shared__ float vals[kSortCapacity];
  __shared__ int ids[kSortCapacity];
  __shared__ int count;
  __shared__ float thr_val;
  __shared__ int thr_id;
  __shared__ float red_m[kThreads / 32], red_s[kThreads / 32];
  __shared__ int red_i[kThreads / 32];
  __shared__ float red_f[kThreads / 32];
  __shared__ float row_lse;
  __shared__ int row_posinf;

  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * row_stride;
  for (int i = threadIdx.x; i < kp; i += kThreads) { vals[i] = -INFINITY; ids[i] = INT_MAX; }
  if (threadIdx.x == 0) { count = 0; thr_val = -INFINITY; thr_id = INT_MAX; }
  __syncthreads();

  float m = -INFINITY, s = 0.f;
  int nan_seen = 0, n_posinf = 0;
  for (int base = 0; base < V; base += kTile) {
    const float tv = thr_val;
    const int ti = thr_id;
#pragma unroll
    for (int it = 0; it < kItems; ++it) {
      const int id = base + it * kThreads + threadIdx.x;
      if (id < V) {
        const float y = static_cast<float>(x[id]) / temperature;
        if (y != y) {
          nan_seen = 1;
        } else if (y == INFINITY) {
          ++n_posinf;
        } else if (y > m) {
          s = s * expf(m - y) + 1.f;  // m = -inf gives s = 1
          m = y;
        } else if (y > -INFINITY) {
          s += expf(y - m);
        }
        if (better(y, id, tv, ti)) {  // false for NaN
          const int slot = atomicAdd(&count, 1);
          vals[kp + slot] = y;
          ids[kp + slot] = id;
        }
      }
    }
    __syncthreads();
    const int c = count;
    if (c > kCandidates - kTile || (base + kTile >= V && c > 0)) {
      merge_candidates(vals, ids, kp, c);
      if (threadIdx.x == 0) { count = 0; thr_val = vals[kk - 1]; thr_id = ids[kk - 1]; }
    }
    __syncthreads();
  }

  // Block-wide log-sum-exp, NaN flag and +inf count.
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffff, m, o);
    const float s2 = __shfl_xor_sync(0xffffffff, s, o);
    lse_merge(m, s, m2, s2);
    nan_seen |= __shfl_xor_sync(0xffffffff, nan_seen, o);
    n_posinf += __shfl_xor_sync(0xffffffff, n_posinf, o);
  }
  if (lane == 0) { red_m[warp] = m; red_s[warp] = s; red_i[warp] = nan_seen; red_f[warp] = __int_as_float(n_posinf); }
  __syncthreads();
  if (threadIdx.x == 0) {
    float bm = -INFINITY, bs = 0.f;
    int bnan = 0, bpos = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      lse_merge(bm, bs, red_m[w], red_s[w]);
      bnan |= red_i[w];
      bpos += __float_as_int(red_f[w]);
    }
    float lse = bm + logf(bs);
    if (bpos > 0) lse = INFINITY;
    if (bm == -INFINITY && bpos == 0) lse = -INFINITY;
    if (bnan) lse = NAN;
    row_lse = lse;
    row_posinf = bpos;
  }
  __syncthreads();
  const float lse = row_lse;
  const int npos = row_posinf;
  const float posinf_logprob = npos > 0 ? -logf(static_cast<float>(npos)) : 0.f;

  float p_part = 0.f;
  for (int j = threadIdx.x; j < k; j += kThreads) {
    const float lp = npos > 0 ? (vals[j] == INFINITY ? posinf_logprob : -INFINITY) : vals[j] - lse;
    indices[row * k + j] = ids[j];
    logprobs[row * k + j] = lp;
    p_part += expf(lp);
  }
  const float p_sum = block_reduce_sum(p_part, red_f);
  if (threadIdx.x == 0) {
    auto prob = [&](int j) { return npos > 0 ? (vals[j] == INFINITY ? expf(posinf_logprob) : 0.f) : expf(vals[j] - lse); };
    lse_out[row] = lse;
    margin_out[row] = kk >= 2 ? prob(0) - prob(1) : prob(0);
    residual_out[row] = fmaxf(0.f, 1.f - p_sum);
  }
}

}  // namespace

TopKResult topk_pseudo_labels_cuda(const at::Tensor& logits, int64_t k, double temperature) {
  check_topk_args(logits, k, temperature);
  TORCH_CHECK_VALUE(logits.is_cuda(), "topk_pseudo_labels_cuda needs a CUDA tensor, got ", logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  auto out = allocate_topk_outputs(logits, k);
  auto& [indices, logprobs, lse, margin, residual] = out;
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0) return out;
  TORCH_CHECK_VALUE(N <= INT_MAX, "at most 2^31 - 1 rows, got ", N);
  const int kk = static_cast<int>(std::min<int64_t>(std::max<int64_t>(k, 2), V));
  int kp = 1;
  while (kp < kk) kp <<= 1;
  auto stream = c10::cuda::getCurrentCUDAStream();
  CLINKD_DISPATCH_LOGITS(logits.scalar_type(), "topk_pseudo_labels_cuda", [&] {
    topk_pseudo_labels_kernel<scalar_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), logits.stride(0), static_cast<int>(V), static_cast<int>(k), kk, kp,
        static_cast<float>(temperature), indices.data_ptr<int32_t>(), logprobs.data_ptr<float>(),
        lse.data_ptr<float>(), margin.data_ptr<float>(), residual.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace clinkd
