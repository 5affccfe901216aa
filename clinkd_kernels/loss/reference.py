"""Plain PyTorch reference of the distillation loss: the spec the kernels are tested against.

Written for clarity: it materialises every [N, V] intermediate. Float64 inputs give a float64
reference; float16/bfloat16 inputs are computed in float32 unless ``compute_dtype`` says otherwise
(tests pass the input dtype there to get the "plain torch in the same low dtype" baseline).

Math, per row i (V = student vocabulary, T = temperature):

    q      = softmax(z / T)                              student at temperature T
    CE_i   = −log softmax(z)[labels_i]                   cross-entropy at T = 1
    dense teacher t:   p = softmax(t[:, :V] / T),   KD_i = Σ_v p_v (log p_v − log q_v)
    sparse teacher (top-k indices idx, log-probs lp, residual r):
           KD_i = Σ_j p_j (lp_j − log q_{idx_j}) + r (log r − log(1 − Σ_j q_{idx_j})),  p_j = exp(lp_j)
           log(1 − Σ_j q_{idx_j}) is taken as the log-sum-exp of log q over the columns outside the
           top k (exact even when the student puts almost all its mass on the top k); 0·log 0 = 0.
           With k = V no column is left for the bucket and r (then only extraction rounding) is ignored.

Rows with labels_i == ignore_index are not valid. w = token_weights (default 1), s = T² if t2_scale else 1:

    mean: KD = s Σ_valid w_i KD_i / Σ_valid w_i,  CE = Σ_valid CE_i / #valid,  loss = (α KD + β CE)/(α + β)
    sum:  KD = s Σ_valid w_i KD_i,                CE = Σ_valid CE_i,          loss = (α KD + β CE)/(α + β)
    none: the same per row ([N], 0 on rows that are not valid)

An empty sum or a zero weight sum makes that part 0 (never NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..topk import PseudoLabels


def _compute_dtype(x: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def kd_per_row_reference(
    log_q: torch.Tensor,
    *,
    teacher_logits: torch.Tensor | None = None,
    teacher: PseudoLabels | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KD_i = KL(teacher_i ‖ student_i) for log_q [N, V] = log softmax(z / T); returns [N]."""
    V = log_q.shape[1]
    if teacher_logits is not None:
        log_p = F.log_softmax(teacher_logits[:, :V].to(log_q.dtype) / temperature, dim=-1)
        p = log_p.exp()
        # p = 0 contributes 0 (the limit of p log p), also where the student has log q = −inf.
        return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    idx = teacher.indices.long()
    lp = teacher.logprobs.to(log_q.dtype)
    r = teacher.residual.to(log_q.dtype)
    if idx.shape[1] == V:
        r = torch.zeros_like(r)  # k = V: no column is outside the top k, so r can only be rounding
    p = lp.exp()
    log_q_top = log_q.gather(1, idx)
    top = torch.where(p > 0, p * (lp - log_q_top), torch.zeros_like(p)).sum(-1)
    in_top = torch.zeros_like(log_q, dtype=torch.bool).scatter_(1, idx, True)
    log_rest = torch.logsumexp(log_q.masked_fill(in_top, float("-inf")), dim=-1)  # log(1 − Σ_j q_idx_j)
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    bucket = torch.where(r > 0, r * (safe_r.log() - log_rest), torch.zeros_like(r))
    return top + bucket


def kd_loss_reference(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_logits: torch.Tensor | None = None,
    teacher: PseudoLabels | None = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 1.0,
    ignore_index: int = -100,
    token_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    t2_scale: bool = False,
    return_components: bool = False,
    compute_dtype: torch.dtype | None = None,
):
    """Distillation loss from full logits. student_logits [N, V], labels [N], teacher_logits [N, V_t ≥ V]
    or ``teacher`` PseudoLabels [N, k]; token_weights [N]. Returns loss ([] or [N] for "none"), or
    (loss, kd, ce) with ``return_components``. Differentiable w.r.t. student_logits."""
    cdt = _compute_dtype(student_logits, compute_dtype)
    z = student_logits.to(cdt)
    valid = labels != ignore_index
    n_rows = z.shape[0]

    ce = F.cross_entropy(z, torch.where(valid, labels, torch.zeros_like(labels)).long(), reduction="none")
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    if teacher_logits is None and teacher is None:
        kd = torch.zeros(n_rows, dtype=cdt, device=z.device)
    else:
        log_q = F.log_softmax(z / temperature, dim=-1)
        kd = kd_per_row_reference(log_q, teacher_logits=teacher_logits, teacher=teacher, temperature=temperature)

    w = torch.ones(n_rows, dtype=cdt, device=z.device) if token_weights is None else token_weights.to(cdt)
    w = torch.where(valid, w, torch.zeros_like(w))
    scale = temperature**2 if t2_scale else 1.0
    kd_rows = torch.where(w != 0, w * kd * scale, torch.zeros_like(kd))  # weight 0 drops a row, even an infinite one

    if reduction == "none":
        kd_part, ce_part = kd_rows, ce
    elif reduction == "sum":
        kd_part, ce_part = kd_rows.sum(), ce.sum()
    elif reduction == "mean":
        w_sum, n_valid = w.sum(), valid.sum()
        kd_part = torch.where(w_sum > 0, kd_rows.sum() / torch.where(w_sum > 0, w_sum, 1.0), 0.0)
        ce_part = torch.where(n_valid > 0, ce.sum() / n_valid.clamp(min=1), 0.0)
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")

    loss = 0.0
    if alpha != 0:
        loss = loss + alpha * kd_part
    if beta != 0:
        loss = loss + beta * ce_part
    loss = loss / (alpha + beta)
    if return_components:
        return loss, kd_part, ce_part
    return loss


def linear_kd_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    **kwargs,
):
    """The lm_head matmuls with full logits, then ``kd_loss_reference``. hidden [N, Hd], weight [V, Hd],
    bias [V], teacher_hidden [N, Hd_t], teacher_weight [V_t, Hd_t], teacher_bias [V_t]."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    teacher_logits = None
    if teacher_hidden is not None:
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.t()
            if teacher_bias is not None:
                teacher_logits = teacher_logits + teacher_bias
    return kd_loss_reference(logits, labels, teacher_logits=teacher_logits, compute_dtype=compute_dtype, **kwargs)
