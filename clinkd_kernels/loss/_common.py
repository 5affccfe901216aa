"""What kd_loss and linear_kd_loss share: argument checks, reduction coefficients, assembling the loss.

Every implementation (Triton kernel, chunked PyTorch path) computes per row only the raw KD_i and
CE_i and the gradient of  coef_kd_i·KD_i + coef_ce_i·CE_i  w.r.t. the row's logits. The reduction,
token weights, T² and α/β all live in the two [N] coefficient vectors made here, before any row is
processed, so that a mean over the whole batch needs no second pass:

    w_i = token_weights_i·[valid_i],  s = T² if t2_scale else 1
    mean: kd_scale_i = s·w_i / Σ w,  ce_scale_i = [valid_i] / #valid      (0 when the sum is 0)
    sum, none: kd_scale_i = s·w_i,  ce_scale_i = [valid_i]
    coef_kd_i = α·kd_scale_i / (α + β),  coef_ce_i = β·ce_scale_i / (α + β)
    loss = Σ_i coef_kd_i·KD_i + coef_ce_i·CE_i   (per row for "none")
"""

from __future__ import annotations

import torch

from clinkd_kernels._validation import (FLOAT_DTYPES, check_int, check_nonnegative_float, check_positive_float,
                                        check_same_device, check_shape, check_tensor, first_rows)
from clinkd_kernels.topk.pseudo_labels import PseudoLabels

REDUCTIONS = ("mean", "sum", "none")
REFERENCE_DTYPES = FLOAT_DTYPES + (torch.float64,)
LABEL_DTYPES = (torch.int64, torch.int32)


def check_options(temperature, alpha, beta, ignore_index, reduction) -> tuple[float, float, float]:
    temperature = check_positive_float("temperature", temperature)
    alpha = check_nonnegative_float("alpha", alpha)
    beta = check_nonnegative_float("beta", beta)
    if alpha + beta == 0:
        raise ValueError("alpha and beta must not both be 0 (alpha weighs the KD term, beta the cross-entropy)")
    check_int("ignore_index", ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return temperature, alpha, beta


def check_labels(labels, n_rows: int, ref_name: str, ref: torch.Tensor) -> None:
    check_tensor("labels", labels, ndim=1, dtypes=LABEL_DTYPES)
    check_shape("labels", labels, [n_rows])
    check_same_device(**{ref_name: ref, "labels": labels})


def check_token_weights(token_weights, n_rows: int, ref_name: str, ref: torch.Tensor) -> None:
    if token_weights is None:
        return
    check_tensor("token_weights", token_weights, ndim=1, dtypes=REFERENCE_DTYPES)
    check_shape("token_weights", token_weights, [n_rows])
    check_same_device(**{ref_name: ref, "token_weights": token_weights})


def check_teacher_choice(alpha: float, has_dense: bool, teacher) -> None:
    if has_dense and teacher is not None:
        raise ValueError("give either a dense teacher or `teacher` pseudo-labels, not both")
    if teacher is not None and not isinstance(teacher, PseudoLabels):
        raise TypeError(f"teacher must be a PseudoLabels (clinkd_kernels.topk.pseudo_labels), got {type(teacher).__name__}")
    if alpha > 0 and not has_dense and teacher is None:
        raise ValueError("alpha > 0 needs a teacher: pass the dense teacher or `teacher` pseudo-labels "
                         "(or alpha=0 for cross-entropy alone)")


def check_pseudo_labels_shapes(teacher: PseudoLabels, n_rows: int, vocab: int, ref_name: str, ref: torch.Tensor) -> None:
    check_tensor("teacher.indices", teacher.indices, ndim=2, dtypes=LABEL_DTYPES)
    k = teacher.indices.shape[1]
    check_shape("teacher.indices", teacher.indices, [n_rows, None])
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher.indices must have k in [1, {vocab}] (the student vocabulary) columns, got k={k}")
    check_tensor("teacher.logprobs", teacher.logprobs, ndim=2, dtypes=REFERENCE_DTYPES)
    check_shape("teacher.logprobs", teacher.logprobs, [n_rows, k])
    check_tensor("teacher.residual", teacher.residual, ndim=1, dtypes=REFERENCE_DTYPES)
    check_shape("teacher.residual", teacher.residual, [n_rows])
    check_same_device(**{ref_name: ref, "teacher.indices": teacher.indices,
                         "teacher.logprobs": teacher.logprobs, "teacher.residual": teacher.residual})


def check_values(labels: torch.Tensor, vocab: int, ignore_index: int, token_weights, topk) -> None:
    """Checks that read tensor values (one host sync): labels, token weights, pseudo-labels.

    ``topk`` is (indices, logprobs, residual) or None. Run inside the ops, so a compiled graph
    keeps them without a graph break. Every check's row mask is built on the device and their
    ``any()`` flags come to the host together; the first failing check (in the order below) raises.
    """
    checks = [((labels != ignore_index) & ((labels < 0) | (labels >= vocab)),
               lambda bad: f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
                           f"rows {first_rows(bad)} hold e.g. {labels[bad][:3].tolist()}")]
    if token_weights is not None:
        checks.append((~torch.isfinite(token_weights) | (token_weights < 0),
                       lambda bad: f"token_weights must be finite and >= 0; rows {first_rows(bad)} are not"))
    if topk is not None:
        idx, lp, res = topk
        checks.append((((idx < 0) | (idx >= vocab)).any(1),
                       lambda bad: f"teacher.indices must be in [0, {vocab}) (the student vocabulary); "
                                   f"rows {first_rows(bad)} are not"))
        if idx.shape[1] > 1:
            srt = idx.sort(dim=1).values
            checks.append(((srt[:, 1:] == srt[:, :-1]).any(1),
                           lambda bad: f"teacher.indices must not repeat a token within a row; "
                                       f"rows {first_rows(bad)} do"))
        # log-probabilities are <= 0 up to rounding; the residual is a probability mass.
        checks.append(((torch.isnan(lp) | (lp > 1e-4)).any(1),
                       lambda bad: f"teacher.logprobs must be log-probabilities (<= 0, no NaN); "
                                   f"rows {first_rows(bad)} are not"))
        checks.append((~(res >= 0) | (res > 1 + 1e-4),
                       lambda bad: f"teacher.residual must be in [0, 1]; rows {first_rows(bad)} are not"))
    failed = torch.stack([bad.any() for bad, _ in checks]).tolist()
    for (bad, message), hit in zip(checks, failed):
        if hit:
            raise ValueError(message(bad))


def coefficients(labels: torch.Tensor, token_weights, *, ignore_index: int, temperature: float, alpha: float,
                 beta: float, reduction: str, t2_scale: bool, dtype=torch.float32):
    """(coef_kd [N], coef_ce [N], kd_scale [N], ce_scale [N]) as in the module docstring; no host sync."""
    valid = labels != ignore_index
    w = torch.ones(labels.shape, dtype=dtype, device=labels.device) if token_weights is None else token_weights.to(dtype)
    w = torch.where(valid, w, torch.zeros_like(w))
    v = valid.to(dtype)
    kd_scale = w * (temperature ** 2 if t2_scale else 1.0)
    ce_scale = v
    if reduction == "mean":
        w_sum, n_valid = w.sum(), v.sum()
        kd_scale = torch.where(w_sum > 0, kd_scale / torch.where(w_sum > 0, w_sum, 1.0), 0.0)
        ce_scale = ce_scale / n_valid.clamp(min=1.0)
    total = alpha + beta
    return kd_scale * (alpha / total), ce_scale * (beta / total), kd_scale, ce_scale


def assemble(kd_rows: torch.Tensor, ce_rows: torch.Tensor, kd_scale: torch.Tensor, ce_scale: torch.Tensor, *,
             alpha: float, beta: float, reduction: str):
    """(loss, kd, ce) from the raw per-row KD_i, CE_i: [] each, or [N] each for "none".

    A row with scale 0 contributes 0 even when its KD_i is infinite (a weight-0 row is dropped).
    """
    kd_part = torch.where(kd_scale != 0, kd_scale * kd_rows, 0.0)
    ce_part = torch.where(ce_scale != 0, ce_scale * ce_rows, 0.0)
    if reduction != "none":  # sums over rows in float64: one rounding at the end
        kd_part = kd_part.sum(dtype=torch.float64).to(kd_rows.dtype)
        ce_part = ce_part.sum(dtype=torch.float64).to(ce_rows.dtype)
    loss = torch.zeros_like(kd_part)
    if alpha != 0:
        loss = loss + alpha * kd_part
    if beta != 0:
        loss = loss + beta * ce_part
    return loss / (alpha + beta), kd_part, ce_part


def default_chunk_size(n_rows: int, vocab: int, device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """Rows per chunk so that one [chunk, V] logits buffer is about 128 MiB on CPU (fp32 compute; the row
    path's own temporaries are bounded separately) or 512 MiB on CUDA (logits in ``dtype``), capped by
    1/16 of the free GPU memory; a power of two in [16, 4096], never above n_rows rounded up to a power of two.

    The lm_head matmuls want many rows: below ~1024 rows a GPU matmul against a Qwen-size vocabulary
    turns weight-bandwidth-bound, and CPU BLAS here ran 3-4x slower at 32 rows than at 1024.
    """
    budget = 128 * 2**20
    element = 8 if dtype == torch.float64 else 4
    if device.type == "cuda":
        element = torch.empty(0, dtype=dtype).element_size()
        budget = 512 * 2**20
        try:
            free, _ = torch.cuda.mem_get_info(device)
            budget = min(budget, free // 16)
        except Exception:  # pragma: no cover - mem_get_info unsupported: keep the static budget
            pass
    rows = max(16, budget // (vocab * element))
    rows = 1 << (rows.bit_length() - 1)
    rows = min(rows, 4096, 1 << max(0, (max(n_rows, 1) - 1).bit_length()))
    return max(rows, 1)


def scale_saved_(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """grad·factor for a gradient saved by forward: in place in eager mode (a copy would double a
    [N, V] or [V, Hd] buffer at the peak of backward), out of place while torch.compile /
    aot_autograd traces the backward (functionalised graphs must not mutate saved tensors)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if torch.compiler.is_compiling() or isinstance(grad, (FunctionalTensor, FakeTensor)):
        return grad * factor
    return grad.mul_(factor)
