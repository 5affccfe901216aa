// CPU kernel of the distillation-loss rows (kd_rows.h): rows in parallel, three or four passes over each.
//
// Per row, with s = 1/T, on fp32 values (fp64 for fp64 input; fp16/bf16 rows are converted once into a
// per-thread fp32 row buffer):
//   1. statistics: max z (and max t), and whether the row has NaN or +inf (an undefined softmax);
//   2. sums: S_q = Σ exp(s·z − s·max z), S_1 = Σ exp(z − max z) (when T ≠ 1), S_p for a dense teacher;
//      top-k: also the sum over the columns outside the top k, summed directly (a byte mask marks the
//      top columns), never as S_q minus the top: 1 − Q can be far below S_q's rounding;
//   3. the last pass forms q, p (and softmax(z) for T ≠ 1) again, accumulates KD and writes the gradient;
//      top-k columns and the label column are then set from their own formulas.
// Every pass is one vectorisable loop (exp_nonpositive, cpu_math.h); a row of Qwen's 151 936 columns is
// 600 KB of fp32 and stays in L2 between passes. Block sums are fp32 (64 values), added in fp64.
// Compared with the chunked PyTorch path this reads each row three or four times instead of about ten, and
// makes no [rows, V] temporaries.
#include "kd_rows.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../cpu_math.h"

namespace clinkd {
namespace {

// Sums run in fp32 over blocks of kBlock values (kBlock / lanes terms per vector lane), added in fp64:
// a few ulps per block whatever V is; 1024-value blocks (128 terms a lane) measured 10x the error of
// PyTorch's cascade sums on rows of 1024.
constexpr int64_t kBlock = 64;

template <typename acc_t>
constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();

// ---------------------------------------------------------------------------------------------------
// The passes. One body (a macro) is defined twice: for fp32 as functions compiled per CPU target
// (CLINKD_CPU_CLONES) around the vectorisable exp_nonpositive, for fp64 with std::exp. (The simd loops
// are plain functions, not templates: GCC vectorises an `omp simd` reduction inside a target clone,
// not one inlined into it from a template, which ran 4-8x slower here.)

#define CLINKD_ROW_PASSES(T, EXP, ATTR, SUFFIX)                                                              \
  ATTR T row_max_##SUFFIX(const T* x, int64_t n, int* bad) {                                                \
    constexpr T inf = std::numeric_limits<T>::infinity();                                                   \
    T m = -inf;                                                                                             \
    int b = 0;                                                                                              \
    _Pragma("omp simd reduction(max : m) reduction(| : b)") for (int64_t i = 0; i < n; ++i) {               \
      const T v = x[i];                                                                                     \
      b |= (v != v) | (v == inf);                                                                           \
      m = std::max(m, v < inf ? v : -inf); /* NaN compares false */                                         \
    }                                                                                                       \
    *bad |= b;                                                                                              \
    return m;                                                                                               \
  }                                                                                                         \
  /* Σ_i [skip[i] == 0] exp(scale·x[i] − shift), every exponent <= 0 by the caller's shift; skip may be null */ \
  ATTR double exp_sum_##SUFFIX(const T* x, const uint8_t* skip, int64_t n, T scale, T shift) {              \
    double total = 0.0;                                                                                     \
    for (int64_t a = 0; a < n; a += kBlock) {                                                               \
      const int64_t len = std::min(kBlock, n - a);                                                          \
      const T* xa = x + a;                                                                                  \
      T sum = 0;                                                                                            \
      if (skip == nullptr) {                                                                                \
        _Pragma("omp simd reduction(+ : sum)") for (int64_t i = 0; i < len; ++i) sum += EXP(scale * xa[i] - shift); \
      } else {                                                                                              \
        const uint8_t* sa = skip + a;                                                                       \
        _Pragma("omp simd reduction(+ : sum)") for (int64_t i = 0; i < len; ++i) sum +=                     \
            sa[i] ? T(0) : EXP(scale * xa[i] - shift);                                                      \
      }                                                                                                     \
      total += static_cast<double>(sum);                                                                    \
    }                                                                                                       \
    return total;                                                                                           \
  }                                                                                                         \
  /* dense teacher: KD = Σ p (log p − log q), p = 0 adding 0 even where log q = −inf;                      \
     g = c_ce·softmax(z) + c_kd_s·(q − p) (label column set by the caller); g may be z itself */          \
  ATTR double dense_last_pass_##SUFFIX(const T* z, const T* t, int64_t n, T s, T mq, T lsq, T mp, T lsp,    \
                                       T m1, T ls1, bool s_is_1, T c_ce, T c_kd_s, T* g) {                 \
    double total = 0.0;                                                                                     \
    for (int64_t a = 0; a < n; a += kBlock) {                                                               \
      const int64_t len = std::min(kBlock, n - a);                                                          \
      const T *za = z + a, *ta = t + a;                                                                     \
      T kd = 0;                                                                                             \
      if (g == nullptr) {                                                                                   \
        _Pragma("omp simd reduction(+ : kd)") for (int64_t i = 0; i < len; ++i) {                           \
          const T lq = (s * za[i] - mq) - lsq, lp = (s * ta[i] - mp) - lsp;                                 \
          const T p = EXP(lp);                                                                              \
          kd += p > 0 ? p * (lp - lq) : T(0);                                                               \
        }                                                                                                   \
      } else if (s_is_1) { /* softmax(z) is q: one exp fewer (a select of two exps does not vectorise) */   \
        T* ga = g + a;                                                                                      \
        _Pragma("omp simd reduction(+ : kd)") for (int64_t i = 0; i < len; ++i) {                           \
          const T lq = (s * za[i] - mq) - lsq, lp = (s * ta[i] - mp) - lsp; /* za[i] read before ga[i] */   \
          const T q = EXP(lq), p = EXP(lp);                                                                 \
          kd += p > 0 ? p * (lp - lq) : T(0);                                                               \
          ga[i] = c_ce * q + c_kd_s * (q - p);                                                              \
        }                                                                                                   \
      } else {                                                                                              \
        T* ga = g + a;                                                                                      \
        _Pragma("omp simd reduction(+ : kd)") for (int64_t i = 0; i < len; ++i) {                           \
          const T zi = za[i];                                                                               \
          const T lq = (s * zi - mq) - lsq, lp = (s * ta[i] - mp) - lsp;                                    \
          const T q = EXP(lq), p = EXP(lp);                                                                 \
          kd += p > 0 ? p * (lp - lq) : T(0);                                                               \
          ga[i] = c_ce * EXP((zi - m1) - ls1) + c_kd_s * (q - p);                                           \
        }                                                                                                   \
      }                                                                                                     \
      total += static_cast<double>(kd);                                                                     \
    }                                                                                                       \
    return total;                                                                                           \
  }                                                                                                         \
  /* top-k teacher or none, off the top columns: g = c_ce·softmax(z) + factor·q; g may be z itself */      \
  ATTR void sparse_last_pass_##SUFFIX(const T* z, int64_t n, T s, T mq, T lsq, T m1, T ls1, bool s_is_1,    \
                                      T c_ce, T factor, T* g) {                                             \
    if (s_is_1) {                                                                                           \
      _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) g[i] = (c_ce + factor) * EXP((s * z[i] - mq) - lsq); \
    } else {                                                                                                \
      _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) {                                                 \
        const T zi = z[i];                                                                                  \
        g[i] = c_ce * EXP((zi - m1) - ls1) + factor * EXP((s * zi - mq) - lsq);                             \
      }                                                                                                     \
    }                                                                                                       \
  }

inline double exp_f64(double x) { return std::exp(x); }

CLINKD_ROW_PASSES(float, exp_nonpositive, CLINKD_CPU_CLONES, f32)
CLINKD_ROW_PASSES(double, exp_f64, , f64)
#undef CLINKD_ROW_PASSES

// The passes of a compute type, by name.
template <typename acc_t>
struct Passes;
#define CLINKD_PASSES_OF(T, SUFFIX)                                                                         \
  template <>                                                                                               \
  struct Passes<T> {                                                                                        \
    static T max(const T* x, int64_t n, int* bad) { return row_max_##SUFFIX(x, n, bad); }                   \
    static double sum(const T* x, const uint8_t* skip, int64_t n, T sc, T sh) {                             \
      return exp_sum_##SUFFIX(x, skip, n, sc, sh);                                                          \
    }                                                                                                       \
    static double dense(const T* z, const T* t, int64_t n, T s, T mq, T lsq, T mp, T lsp, T m1, T ls1,      \
                        bool s1, T cce, T ckd, T* g) {                                                      \
      return dense_last_pass_##SUFFIX(z, t, n, s, mq, lsq, mp, lsp, m1, ls1, s1, cce, ckd, g);              \
    }                                                                                                       \
    static void sparse(const T* z, int64_t n, T s, T mq, T lsq, T m1, T ls1, bool s1, T cce, T f, T* g) {   \
      sparse_last_pass_##SUFFIX(z, n, s, mq, lsq, m1, ls1, s1, cce, f, g);                                  \
    }                                                                                                       \
  };
CLINKD_PASSES_OF(float, f32)
CLINKD_PASSES_OF(double, f64)
#undef CLINKD_PASSES_OF

// ---------------------------------------------------------------------------------------------------
// Row access: a pointer into the tensor when its dtype is acc_t, else a converted copy in `buf`.

template <typename acc_t>
const acc_t* row_as(const at::Tensor& x, int64_t row, int64_t n, std::vector<acc_t>& buf) {
  if (x.scalar_type() == c10::CppTypeToScalarType<acc_t>::value) {
    return x.const_data_ptr<acc_t>() + row * x.stride(0);
  }
  buf.resize(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kd_rows_cpu_load", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>() + row * x.stride(0);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(p[i]);
  });
  return buf.data();
}

template <typename acc_t>
void store_row(const at::Tensor& out, int64_t row, int64_t n, const acc_t* g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "kd_rows_cpu_store", [&] {
    scalar_t* p = out.data_ptr<scalar_t>() + row * out.stride(0);
    if (static_cast<const void*>(p) == static_cast<const void*>(g)) return;  // written in place
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(g[i]);
  });
}

template <typename acc_t>
void fill_row(const at::Tensor& out, int64_t row, int64_t n, acc_t value) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "kd_rows_cpu_fill", [&] {
    scalar_t* p = out.data_ptr<scalar_t>() + row * out.stride(0);
    std::fill(p, p + n, static_cast<scalar_t>(value));
  });
}

struct Args {
  const at::Tensor& z;
  const at::Tensor& labels;
  const at::Tensor* teacher;   // dense logits, or null
  const at::Tensor* idx;       // top-k indices, or null (then logprobs, residual are set too)
  const at::Tensor* lp;
  const at::Tensor* res;
  double inv_t;
  int64_t ignore_index;
  const at::Tensor& coef_kd;
  const at::Tensor& coef_ce;
  const at::Tensor& kd_out;
  const at::Tensor& ce_out;
  const at::Tensor* grad;
};

template <typename acc_t>
acc_t scalar_at(const at::Tensor& x, int64_t i) {
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kd_rows_cpu_scalar",
                                    [&] { return static_cast<acc_t>(x.const_data_ptr<scalar_t>()[i]); });
}

int64_t index_at(const at::Tensor& x, int64_t i) {
  return x.scalar_type() == at::kLong ? x.const_data_ptr<int64_t>()[i] : x.const_data_ptr<int32_t>()[i];
}

template <typename acc_t>
void set_out(const at::Tensor& out, int64_t i, double v) {
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "kd_rows_cpu_out",
                             [&] { out.data_ptr<scalar_t>()[i] = static_cast<scalar_t>(v); });
}

template <typename acc_t>
void rows(const Args& a, int64_t begin, int64_t end) {
  using P = Passes<acc_t>;
  constexpr acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const int64_t V = a.z.size(1);
  const acc_t s = static_cast<acc_t>(a.inv_t);
  const bool s_is_1 = a.inv_t == 1.0;
  const int64_t k = a.idx ? a.idx->size(1) : 0;
  std::vector<acc_t> zbuf, tbuf, gbuf, ztop;
  std::vector<uint8_t> skip(a.idx ? V : 0, 0);
  const bool grad_in_place_ok = a.grad && a.grad->scalar_type() == c10::CppTypeToScalarType<acc_t>::value;

  for (int64_t row = begin; row < end; ++row) {
    const int64_t label = index_at(a.labels, row);
    const acc_t c_kd = scalar_at<acc_t>(a.coef_kd, row), c_ce = scalar_at<acc_t>(a.coef_ce, row);
    if (label == a.ignore_index) {  // no loss: 0, and a zero gradient row
      set_out<acc_t>(a.kd_out, row, 0.0);
      set_out<acc_t>(a.ce_out, row, 0.0);
      if (a.grad) fill_row<acc_t>(*a.grad, row, V, acc_t(0));
      continue;
    }
    TORCH_CHECK_VALUE(label >= 0 && label < V, "labels[", row, "] = ", label, " is outside [0, ", V,
                      ") and is not ignore_index = ", a.ignore_index);
    const acc_t* z = row_as<acc_t>(a.z, row, V, zbuf);
    int bad = 0;
    const acc_t zmax = P::max(z, V, &bad);
    const bool has_teacher = a.teacher || a.idx;
    if (bad || zmax == -kInf<acc_t>) {  // undefined student softmax: NaN, as the PyTorch path
      set_out<acc_t>(a.kd_out, row, has_teacher ? nan : 0.0);
      set_out<acc_t>(a.ce_out, row, nan);
      if (a.grad) fill_row<acc_t>(*a.grad, row, V, (c_ce != 0 || (has_teacher && c_kd != 0)) ? nan : acc_t(0));
      continue;
    }
    const acc_t mq = s * zmax, lsq = static_cast<acc_t>(std::log(P::sum(z, nullptr, V, s, mq)));
    const acc_t ls1 = s_is_1 ? lsq : static_cast<acc_t>(std::log(P::sum(z, nullptr, V, acc_t(1), zmax)));
    const acc_t m1 = s_is_1 ? mq : zmax;
    set_out<acc_t>(a.ce_out, row, static_cast<double>((m1 - z[label]) + ls1));   // logsumexp(z) − z[label]

    acc_t* g = nullptr;
    if (a.grad) {
      if (grad_in_place_ok) {
        g = a.grad->data_ptr<acc_t>() + row * a.grad->stride(0);  // may alias z: every z[i] is read before g[i]
      } else {
        gbuf.resize(V);
        g = gbuf.data();
      }
    }
    const acc_t c_kd_s = c_kd * s;
    double kd = 0.0;
    if (a.teacher) {
      const acc_t* t = row_as<acc_t>(*a.teacher, row, V, tbuf);
      int tbad = 0;
      const acc_t tmax = P::max(t, V, &tbad);
      if (tbad || tmax == -kInf<acc_t>) {  // no teacher distribution: NaN KD (the Python checks name the row)
        kd = nan;
        if (g) P::sparse(z, V, s, mq, lsq, m1, ls1, s_is_1, c_ce, c_kd != 0 ? nan : acc_t(0), g);
      } else {
        const acc_t mp = s * tmax, lsp = static_cast<acc_t>(std::log(P::sum(t, nullptr, V, s, mp)));
        kd = P::dense(z, t, V, s, mq, lsq, mp, lsp, m1, ls1, s_is_1, c_ce, c_kd != 0 ? c_kd_s : acc_t(0), g);
      }
    } else if (a.idx) {
      // p_j = exp(lp_j) as extracted; r the residual mass (0 when k = V: the bucket has no columns).
      double top = 0.0, p_sum = 0.0;
      ztop.resize(k);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t c = index_at(*a.idx, row * k + j);
        TORCH_CHECK_VALUE(c >= 0 && c < V, "teacher.indices[", row, ", ", j, "] = ", c, " is outside [0, ", V, ")");
        skip[c] = 1;
        ztop[j] = z[c];  // kept: the last pass may write the gradient over z
        const acc_t lpj = scalar_at<acc_t>(*a.lp, row * k + j), pj = std::exp(lpj);
        p_sum += pj;
        if (pj > 0) top += pj * (lpj - ((s * ztop[j] - mq) - lsq));
      }
      const acc_t r = k == V ? acc_t(0) : scalar_at<acc_t>(*a.res, row);
      const double rest = P::sum(z, skip.data(), V, s, mq);                    // Σ off the top, relative to mq
      const acc_t log_rest = rest > 0 ? static_cast<acc_t>(std::log(rest)) - lsq : -kInf<acc_t>;  // log(1 − Q)
      kd = top + (r > 0 ? static_cast<double>(r) * (std::log(static_cast<double>(r)) - log_rest) : 0.0);
      if (g) {
        const acc_t mass = static_cast<acc_t>(p_sum) + r;                     // P = Σ p_j + r
        const acc_t rest_factor = log_rest > -kInf<acc_t> ? r / std::exp(log_rest) : r;  // r / (1 − Q)
        P::sparse(z, V, s, mq, lsq, m1, ls1, s_is_1, c_ce, c_kd != 0 ? c_kd_s * (mass - rest_factor) : acc_t(0), g);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t c = index_at(*a.idx, row * k + j);
          const acc_t q = std::exp((s * ztop[j] - mq) - lsq), pj = std::exp(scalar_at<acc_t>(*a.lp, row * k + j));
          const acc_t s1 = s_is_1 ? q : std::exp((ztop[j] - m1) - ls1);
          g[c] = c_ce * s1 + (c_kd != 0 ? c_kd_s * (mass * q - pj) : acc_t(0));
        }
      }
      for (int64_t j = 0; j < k; ++j) skip[index_at(*a.idx, row * k + j)] = 0;
    } else if (g) {
      P::sparse(z, V, s, mq, lsq, m1, ls1, s_is_1, c_ce, acc_t(0), g);
    }
    set_out<acc_t>(a.kd_out, row, has_teacher ? kd : 0.0);
    if (g) {
      g[label] -= c_ce;  // − onehot(label) of the CE gradient
      store_row<acc_t>(*a.grad, row, V, g);
    }
  }
}

void check_args(const Args& a) {
  const auto& z = a.z;
  TORCH_CHECK_VALUE(z.dim() == 2, "z must be 2-D [n, V], got ", z.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(z.scalar_type()), "z must be a floating tensor, got ", z.scalar_type());
  const int64_t n = z.size(0), V = z.size(1);
  TORCH_CHECK_VALUE(V >= 1, "z must have at least one column, got ", V);
  TORCH_CHECK_VALUE(n == 0 || V == 1 || z.stride(1) == 1, "z must have unit stride along V, got ", z.stride(1));
  auto check_vec = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
    TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  };
  check_vec(a.labels, "labels");
  TORCH_CHECK_TYPE(a.labels.scalar_type() == at::kLong || a.labels.scalar_type() == at::kInt,
                   "labels must be int64 or int32, got ", a.labels.scalar_type());
  for (auto* t : {&a.coef_kd, &a.coef_ce, &a.kd_out, &a.ce_out}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble,
                     "coefficients and outputs must be float32 or float64, got ", t->scalar_type());
  }
  check_vec(a.coef_kd, "coef_kd");
  check_vec(a.coef_ce, "coef_ce");
  check_vec(a.kd_out, "kd_out");
  check_vec(a.ce_out, "ce_out");
  TORCH_CHECK_VALUE(z.device().is_cpu(), "kd_rows_cpu needs CPU tensors, got z on ", z.device());
  if (a.teacher) {
    const auto& t = *a.teacher;
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == n && t.size(1) >= V, "teacher_logits must have shape [", n,
                      ", >= ", V, "], got ", t.sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "teacher_logits must be floating, got ", t.scalar_type());
    TORCH_CHECK_VALUE(n == 0 || t.stride(1) == 1, "teacher_logits must have unit stride along V");
    TORCH_CHECK_VALUE(t.device().is_cpu(), "teacher_logits must be a CPU tensor, got ", t.device());
  }
  if (a.idx) {
    TORCH_CHECK_VALUE(a.lp && a.res, "top-k pseudo-labels need indices, logprobs and residual together");
    const auto& i = *a.idx;
    TORCH_CHECK_VALUE(i.dim() == 2 && i.size(0) == n && i.size(1) >= 1 && i.size(1) <= V,
                      "topk_indices must have shape [", n, ", k] with 1 <= k <= V = ", V, ", got ", i.sizes());
    TORCH_CHECK_TYPE(i.scalar_type() == at::kLong || i.scalar_type() == at::kInt, "topk_indices must be int32/int64");
    TORCH_CHECK_VALUE(i.is_contiguous() && a.lp->is_contiguous(), "topk_indices and topk_logprobs must be contiguous");
    TORCH_CHECK_VALUE(a.lp->sizes() == i.sizes(), "topk_logprobs must have the shape of topk_indices ", i.sizes(),
                      ", got ", a.lp->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(a.lp->scalar_type()) && at::isFloatingType(a.res->scalar_type()) &&
                         a.lp->scalar_type() != at::kHalf && a.lp->scalar_type() != at::kBFloat16 &&
                         a.res->scalar_type() != at::kHalf && a.res->scalar_type() != at::kBFloat16,
                     "topk_logprobs and topk_residual must be float32 or float64");
    check_vec(*a.res, "topk_residual");
  }
  if (a.grad) {
    const auto& g = *a.grad;
    TORCH_CHECK_VALUE(g.sizes() == z.sizes(), "grad_out must have the shape of z ", z.sizes(), ", got ", g.sizes());
    TORCH_CHECK_VALUE(n == 0 || V == 1 || g.stride(1) == 1, "grad_out must have unit stride along V");
    TORCH_CHECK_TYPE(at::isFloatingType(g.scalar_type()), "grad_out must be floating, got ", g.scalar_type());
  }
  TORCH_CHECK_VALUE(std::isfinite(a.inv_t) && a.inv_t > 0, "inv_temperature must be finite and > 0, got ", a.inv_t);
}

}  // namespace

void kd_rows_cpu(const at::Tensor& z, const at::Tensor& labels, const std::optional<at::Tensor>& teacher_logits,
                 const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_logprobs,
                 const std::optional<at::Tensor>& topk_residual, double inv_temperature, int64_t ignore_index,
                 const at::Tensor& coef_kd, const at::Tensor& coef_ce, const at::Tensor& kd_out,
                 const at::Tensor& ce_out, const std::optional<at::Tensor>& grad_out) {
  const Args a{z, labels, teacher_logits ? &*teacher_logits : nullptr, topk_indices ? &*topk_indices : nullptr,
               topk_logprobs ? &*topk_logprobs : nullptr, topk_residual ? &*topk_residual : nullptr, inv_temperature,
               ignore_index, coef_kd, coef_ce, kd_out, ce_out, grad_out ? &*grad_out : nullptr};
  check_args(a);
  const int64_t n = z.size(0);
  if (n == 0) return;
  const bool fp64 = z.scalar_type() == at::kDouble;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    if (fp64) {
      rows<double>(a, begin, end);
    } else {
      rows<float>(a, begin, end);
    }
  });
}

}  // namespace clinkd
