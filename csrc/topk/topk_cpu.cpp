// CPU kernel for top-k pseudo-labels: rows in parallel, one pass over each row.
//
// Each row is read in blocks of kBlock values. A block is converted to fp32 (y = x / T) into a small
// buffer that stays in L1, then
//   1. its maximum updates the running (max, sum) of an online log-sum-exp, and the block's
//      exp(y - max) are summed with a vectorisable exp;
//   2. it is offered to a bounded min-heap of the best kk = max(k, 2) entries. The row is scanned in
//      id order, so an entry that only ties the heap's worst can never win (the worst has the lower
//      id): the test is a strict y > worst, and a block whose maximum is below it is skipped whole.
// The heap is kept for kk >= 2 so that the margin p_(1) - p_(2) exists even when k = 1.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../cpu_math.h"
#include "topk.h"

namespace clinkd {
namespace {

constexpr int64_t kBlock = 1024;
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Entry {
  float value;
  int32_t index;
};

// Heap order: "a before b" when a is the better entry, so the heap's front is the worst kept one.
inline bool better(const Entry& a, const Entry& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

struct BlockStats {
  float max;       // largest finite value (-inf if none); NaN is ignored here and flagged instead
  int nan;         // any NaN
  int64_t posinf;  // number of +inf
};

CLINKD_CPU_CLONES BlockStats block_stats(const float* buf, int64_t n) {
  float bmax = -kInf;
  int bnan = 0;
  int64_t bpos = 0;
#pragma omp simd reduction(max : bmax) reduction(| : bnan) reduction(+ : bpos)
  for (int64_t i = 0; i < n; ++i) {
    const float y = buf[i];
    bnan |= (y != y);
    bpos += (y == kInf);
    bmax = std::max(bmax, y < kInf ? y : -kInf);  // NaN compares false: it maps to -inf here
  }
  return {bmax, bnan, bpos};
}

// sum of exp(y - m) over the values below +inf; m is finite and >= every such value.
CLINKD_CPU_CLONES float block_exp_sum(const float* buf, int64_t n, float m) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += buf[i] < kInf ? exp_nonpositive(buf[i] - m) : 0.0f;
  return sum;
}

template <typename scalar_t>
void topk_rows(const scalar_t* logits, int64_t row_stride, int64_t begin, int64_t end, int64_t V, int64_t k,
               float temperature, int32_t* indices, float* logprobs, float* lse_out, float* margin_out,
               float* residual_out) {
  const int64_t kk = std::min<int64_t>(std::max<int64_t>(k, 2), V);
  std::vector<Entry> heap;
  heap.reserve(kk);
  alignas(64) float buf[kBlock];

  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* x = logits + row * row_stride;
    heap.clear();
    float m = -kInf;  // running max of the finite values
    double s = 0.0;   // running sum of exp(y - m)
    int nan_seen = 0;
    int64_t n_posinf = 0;

    for (int64_t start = 0; start < V; start += kBlock) {
      const int64_t n = std::min(kBlock, V - start);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[start + i]) / temperature;
      const BlockStats st = block_stats(buf, n);
      nan_seen |= st.nan;
      n_posinf += st.posinf;
      const float bmax = st.max;

      // 1. online log-sum-exp over the finite values (+inf rows are resolved at the end).
      if (bmax > m) {
        s = (m == -kInf) ? 0.0 : s * std::exp(static_cast<double>(m) - bmax);
        m = bmax;
      }
      if (m > -kInf) s += block_exp_sum(buf, n, m);

      // 2. bounded heap of the best kk entries.
      int64_t i = 0;
      for (; i < n && static_cast<int64_t>(heap.size()) < kk; ++i) {
        const float y = buf[i] != buf[i] ? -kInf : buf[i];
        heap.push_back({y, static_cast<int32_t>(start + i)});
        std::push_heap(heap.begin(), heap.end(), better);
      }
      if (i < n && (bmax > heap.front().value || st.posinf > 0)) {
        for (; i < n; ++i) {
          if (buf[i] > heap.front().value) {
            std::pop_heap(heap.begin(), heap.end(), better);
            heap.back() = {buf[i], static_cast<int32_t>(start + i)};
            std::push_heap(heap.begin(), heap.end(), better);
          }
        }
      }
    }

    std::sort_heap(heap.begin(), heap.end(), better);  // best first
    float lse = m + static_cast<float>(std::log(s));
    if (n_posinf > 0) lse = kInf;
    if (m == -kInf && n_posinf == 0) lse = -kInf;  // every value is -inf: no distribution
    if (nan_seen) lse = std::numeric_limits<float>::quiet_NaN();
    const float posinf_logprob = n_posinf > 0 ? -std::log(static_cast<float>(n_posinf)) : 0.0f;

    float p_sum = 0.0f, p0 = 0.0f, p1 = 0.0f;
    for (int64_t j = 0; j < kk; ++j) {
      float lp;
      if (n_posinf > 0) {
        lp = heap[j].value == kInf ? posinf_logprob : -kInf;
      } else {
        lp = heap[j].value - lse;
      }
      const float p = std::exp(lp);
      if (j == 0) p0 = p;
      if (j == 1) p1 = p;
      if (j < k) {
        indices[row * k + j] = heap[j].index;
        logprobs[row * k + j] = lp;
        p_sum += p;
      }
    }
    lse_out[row] = lse;
    margin_out[row] = kk >= 2 ? p0 - p1 : p0;
    residual_out[row] = std::max(0.0f, 1.0f - p_sum);
  }
}

}  // namespace

TopKResult topk_pseudo_labels_cpu(const at::Tensor& logits, int64_t k, double temperature) {
  check_topk_args(logits, k, temperature);
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "topk_pseudo_labels_cpu needs a CPU tensor, got ", logits.device());
  auto out = allocate_topk_outputs(logits, k);
  auto& [indices, logprobs, lse, margin, residual] = out;
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0) return out;
  CLINKD_DISPATCH_LOGITS(logits.scalar_type(), "topk_pseudo_labels_cpu", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t stride = logits.stride(0);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      topk_rows<scalar_t>(x, stride, begin, end, V, k, static_cast<float>(temperature),
                          indices.data_ptr<int32_t>(), logprobs.data_ptr<float>(), lse.data_ptr<float>(),
                          margin.data_ptr<float>(), residual.data_ptr<float>());
    });
  });
  return out;
}

}  // namespace clinkd
