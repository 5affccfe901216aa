"""The "cpu" backend's row function: the C++ kernel ``clinkd::kd_rows_ext`` (csrc/loss/kd_rows_cpu.cpp).

Same contract as every row function (``rows.py``): z [n, V] (last dim contiguous, any row stride);
teacher_logits [n, >= V] or topk = (indices [n, k], logprobs [n, k], residual [n]) or neither;
coef_kd, coef_ce [n] → writes kd_out, ce_out [n] and, when given, grad_out [n, V] (may be z itself).
Rows run in parallel (``at::parallel_for``), each in three or four vectorised passes, fp32 arithmetic
(fp64 for fp64 input) with fp64 block sums; no [rows, V] temporaries. The kernel repeats the shape,
dtype and index checks in C++, so a call that bypasses the Python checks cannot read out of bounds.
"""

from __future__ import annotations

import torch


def kd_rows_cpu(
    z: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_logits=None,
    topk=None,
    inv_t: float,
    ignore_index: int,
    coef_kd: torch.Tensor,
    coef_ce: torch.Tensor,
    kd_out: torch.Tensor,
    ce_out: torch.Tensor,
    grad_out: torch.Tensor | None,
) -> None:
    """Rows of z [n, V] by the C++ kernel: writes kd_out, ce_out [n] and, when given, grad_out [n, V]."""
    idx, logprobs, residual = (None, None, None) if topk is None else topk
    torch.ops.clinkd.kd_rows_ext(
        z,
        labels.contiguous(),
        teacher_logits,
        idx,
        logprobs,
        residual,
        float(inv_t),
        int(ignore_index),
        coef_kd.contiguous(),
        coef_ce.contiguous(),
        kd_out,
        ce_out,
        grad_out,
    )
