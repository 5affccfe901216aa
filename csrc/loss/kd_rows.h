// Distillation-loss rows on the CPU: the per-row contract of clinkd_kernels.loss (rows.py), in C++.
//
// For a block of n rows of student logits z [n, V] (last dim contiguous), labels [n], and a teacher
// given as dense logits t [n, >= V] (columns beyond V unused), or top-k pseudo-labels (indices [n, k],
// logprobs [n, k], residual [n]), or none, at inverse temperature s = 1/T:
//
//   log q = log_softmax(s·z),  CE = logsumexp(z) − z[label]                       (T = 1 for CE)
//   dense   KD = Σ_v p_v (log p_v − log q_v),  p = softmax(s·t)              (p_v = 0 adds 0)
//   top-k   KD = Σ_j p_j (lp_j − log q_idx_j) + r (log r − log(1 − Q)),  p_j = exp(lp_j), Q = Σ_j q_idx_j
//   grad    coef_ce (softmax(z) − onehot(label)) + coef_kd·s·(q − p)                         (dense)
//           coef_kd·s·(P q_v − r q_v / (1 − Q)) off the top k, coef_kd·s·(P q_j − p_j) on it    (top-k)
//           with P = Σ_j p_j + r; a zero coefficient gives an exactly zero part (ignored rows: 0).
//
// kd_out, ce_out [n] get the raw KD_i, CE_i (0 on ignored rows); grad_out [n, V] (may be z itself) the
// gradient. Rows whose student logits hold NaN or +inf, or are all −inf, have an undefined softmax:
// KD, CE and the gradient are NaN there, as the PyTorch path gives them.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace clinkd {

void kd_rows_cpu(const at::Tensor& z, const at::Tensor& labels, const std::optional<at::Tensor>& teacher_logits,
                 const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_logprobs,
                 const std::optional<at::Tensor>& topk_residual, double inv_temperature, int64_t ignore_index,
                 const at::Tensor& coef_kd, const at::Tensor& coef_ce, const at::Tensor& kd_out,
                 const at::Tensor& ce_out, const std::optional<at::Tensor>& grad_out);

}  // namespace clinkd
