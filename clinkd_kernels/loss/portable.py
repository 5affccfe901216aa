"""The kernel's per-row contract in plain PyTorch (the "portable" backend, any device): raw KD_i, CE_i and
the gradient of coef_kd_i·KD_i + coef_ce_i·CE_i w.r.t. the logits, for a block of rows.

Same math as ``kernels.py`` and the C++ row kernel (``cpu.py``; see their docstrings), computed with
whole-row tensor ops in fp32 (fp64 for fp64 input), a bounded block of rows at a time; in-place ops keep
the temporaries few. About ten elementwise passes over each [rows, V] block: the C++ kernel does three or
four. This path is what runs where neither the Triton kernel nor the extension can.
"""

from __future__ import annotations

import torch

BLOCK_BYTES = 32 * 2**20  # per [rows, V] temporary


def kd_rows_portable(
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
    """z [n, V]; teacher_logits [n, >= V] or topk = (indices [n, k], logprobs [n, k], residual [n]) or
    neither; coef_kd, coef_ce [n]. Writes kd_out, ce_out [n] and, when given, grad_out [n, V] (may be z).

    Rows go through in blocks of ~32 MiB per temporary, whatever n is: callers pick n for their
    matmuls (BLAS wants many rows) without multiplying the temporaries made here."""
    n, vocab = z.shape
    step = max(1, BLOCK_BYTES // (8 * max(vocab, 1)))
    for a in range(0, n, step):
        b = min(n, a + step)
        _rows_block(
            z[a:b],
            labels[a:b],
            teacher_logits=None if teacher_logits is None else teacher_logits[a:b],
            topk=None if topk is None else tuple(t[a:b] for t in topk),
            inv_t=inv_t,
            ignore_index=ignore_index,
            coef_kd=coef_kd[a:b],
            coef_ce=coef_ce[a:b],
            kd_out=kd_out[a:b],
            ce_out=ce_out[a:b],
            grad_out=None if grad_out is None else grad_out[a:b],
        )


def _rows_block(
    z, labels, *, teacher_logits, topk, inv_t, ignore_index, coef_kd, coef_ce, kd_out, ce_out, grad_out
) -> None:
    """``kd_rows_portable`` on one block of rows z [n, V] (its temporaries are [n, V] each)."""
    n, vocab = z.shape
    if n == 0:
        return
    cdt = torch.float64 if z.dtype == torch.float64 else torch.float32
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long().unsqueeze(1)

    zf = z.to(cdt)  # aliases z when z is already fp32: never written below
    has_teacher = teacher_logits is not None or topk is not None
    # log q at temperature T: for the KD term, and for the CE term when T = 1 (else CE needs its own LSE)
    log_q = torch.log_softmax(zf * inv_t if inv_t != 1.0 else zf, dim=1) if has_teacher or inv_t == 1.0 else None
    if inv_t == 1.0:
        ce = -log_q.gather(1, safe_labels).squeeze(1)
    else:
        lse_1 = torch.logsumexp(zf, dim=1, keepdim=True)
        ce = (lse_1 - zf.gather(1, safe_labels)).squeeze(1)

    if teacher_logits is not None:
        diff = torch.log_softmax(teacher_logits[:, :vocab].to(cdt) * inv_t, dim=1)  # → log p − log q, in place
        p = diff.exp()
        diff.sub_(log_q).mul_(p).masked_fill_(p == 0, 0.0)  # p = 0 adds 0, even where log q = −inf
        kd = diff.sum(1)
        del diff
    elif topk is not None:
        idx, lp, r = topk[0].long(), topk[1].to(cdt), topk[2].to(cdt)
        if idx.shape[1] == vocab:
            r = torch.zeros_like(r)  # k = V: the bucket has no columns, r is extraction rounding
        p = lp.exp()
        log_q_top = log_q.gather(1, idx)
        top = torch.where(p > 0, p * (lp - log_q_top), 0.0).sum(1)
        in_top = torch.zeros(n, vocab, dtype=torch.bool, device=z.device).scatter_(1, idx, True)
        log_rest = torch.logsumexp(log_q.masked_fill(in_top, float("-inf")), dim=1)  # log(1 − Σ q_idx), no cancellation
        r_safe = torch.where(r > 0, r, 1.0)
        kd = top + torch.where(r > 0, r * (r_safe.log() - log_rest), 0.0)
    else:
        kd = torch.zeros(n, dtype=cdt, device=z.device)

    kd_out.copy_(torch.where(valid, kd, 0.0))
    ce_out.copy_(torch.where(valid, ce, 0.0))
    if grad_out is None:
        return

    ckd = coef_kd.to(cdt).unsqueeze(1)
    cce = coef_ce.to(cdt).unsqueeze(1)
    if topk is not None:
        # r·q_v/(1 − Q) = r·exp(log q_v − log(1 − Q)) outside the top k (top-k columns are overwritten below)
        log_rest_safe = torch.where(torch.isneginf(log_rest), 0.0, log_rest).unsqueeze(1)
        rest = (log_q - log_rest_safe).exp_().mul_(r.unsqueeze(1))
    q = None if log_q is None else log_q.exp_()  # log_q is not needed any more
    if inv_t != 1.0:
        g = (zf - lse_1).exp_()  # CE part: softmax(z) − onehot(label)
    else:
        g = q.clone() if has_teacher else q  # q itself is needed below only for KD
    g.scatter_add_(1, safe_labels, torch.full(safe_labels.shape, -1.0, dtype=cdt, device=z.device))
    g.mul_(cce).masked_fill_(cce == 0, 0.0)  # zero coefficient → exact 0 (ignored rows too)
    if has_teacher:
        if teacher_logits is not None:
            kd_grad = q.sub_(p)  # q − p
        else:
            mass = (p.sum(1) + r).unsqueeze(1)  # P = Σ_j p_j + r
            kd_grad = q.mul_(mass).sub_(rest)  # P q − r q/(1 − Q)
            kd_grad.scatter_(1, idx, mass * log_q_top.exp() - p)  # top-k columns: P q − p_j
        kd_grad.mul_(ckd * inv_t).masked_fill_(ckd == 0, 0.0)
        g.add_(kd_grad)
    grad_out.copy_(g)
