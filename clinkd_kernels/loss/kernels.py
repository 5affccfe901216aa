"""Triton kernel: per-row KD + CE and the gradient w.r.t. the student logits, in one launch.

One program per row. Pass 1 streams the row's vocabulary tiles once and keeps running
(max, sum-of-exp) pairs (online softmax, fp32) for

    student at T      lse_s = logsumexp(z/T)                    → log q = z/T − lse_s
    student at 1      lse_1 = logsumexp(z)       (CE; skipped when T == 1)
    dense teacher     lse_t = logsumexp(u), u = t/T, and A = Σ e^{u−m}(u − z/T)
                      → KD = A / Σ e^{u−m} − lse_t + lse_s        (= Σ p (log p − log q))
    sparse teacher    lse_r = logsumexp of z/T over the columns outside the top k (a bitmap marks them)
                      → KD = Σ_j p_j (lp_j − z_j/T + lse_s) + r (log r − lse_r + lse_s)

lse_r is summed directly over the non-top-k columns instead of as log(1 − Σ q_idx), which would
cancel catastrophically when the student puts nearly all its mass on the top k.

Pass 2 (when a gradient is wanted) streams the tiles again and writes, with P = Σ_j p_j + r,

    ∂/∂z_v = coef_ce·(softmax(z)_v − [v = label]) + coef_kd·(1/T)·{ q_v − p_v           dense
                                                                  { P q_v − r q_v/(1 − Q)  v outside the top k
                                                                  { P q_v − p_j           v = idx_j
    (q_v/(1 − Q) = exp(z_v/T − lse_r)). The top-k columns are skipped by the tile stores and written
    afterwards, from the logits still in place there, so the gradient may overwrite the logits.
    With a dense teacher pass 2 also re-sums KD term by term (more accurate than pass 1's form).

Each lse is kept as (max m, log Σ e^{x−m}) and log-probabilities are formed as (x − m) − log Σ, the
order torch's log_softmax rounds in. With k = V the bucket has no columns and r is ignored.
Rows whose label is ignore_index skip both passes: KD = CE = 0 and a zero gradient. −inf logits are
masked columns; a +inf logit makes its row's softmax undefined (NaN loss and gradient).

``kd_rows_kernel`` reads as its steps, each a ``@triton.jit`` helper inlined where it is called (the
compiled kernel is the same machine code as one function body): ``_zero_row`` (an ignored row),
``_lse_pass`` (pass 1), ``_sparse_kd`` (the top-k KD), ``_grad_pass`` (pass 2), ``_topk_grad`` (the
top-k columns of the gradient).
"""

import triton
import triton.language as tl

NO_TEACHER, DENSE, SPARSE = 0, 1, 2  # the TEACHER constexpr


@triton.jit
def _lse_update(m, d, x):
    """Fold tile x (fp32, −inf where absent) into the running max m and Σ exp(· − m) d."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all −inf so far: keep exp() away from −inf − −inf
    d = d * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
    return m_new, d


@triton.jit
def _in_topk(bits_row, offs, mask):
    """1 where column offs is one of the row's top-k indices (bit offs of the row's bitmap)."""
    word = tl.load(bits_row + (offs >> 5), mask=mask, other=0)
    return (word >> (offs & 31)) & 1


@triton.jit
def kd_rows_kernel(
    z_ptr,
    stride_z,  # student logits [n, V]
    t_ptr,
    stride_t,  # dense teacher logits [n, >= V] (TEACHER == DENSE)
    idx_ptr,
    lp_ptr,
    stride_k,
    res_ptr,
    K,  # top-k indices / log-probs [n, K], residual [n] (SPARSE)
    bits_ptr,
    stride_bits,  # top-k bitmap [n, ceil(V / 32)] int32 (SPARSE)
    labels_ptr,
    ckd_ptr,
    cce_ptr,  # [n] labels, per-row gradient coefficients
    kd_ptr,
    ce_ptr,  # [n] fp32 outputs: raw KD_i, CE_i
    g_ptr,
    stride_g,  # [n, V] gradient output (may be z_ptr)
    V,
    inv_t,
    ignore_index,
    TEACHER: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    T_IS_ONE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    z_row = z_ptr + row * stride_z
    g_row = g_ptr + row * stride_g
    cols = tl.arange(0, BLOCK_V)

    if label == ignore_index:
        _zero_row(kd_ptr + row, ce_ptr + row, g_row, cols, V, WRITE_GRAD, BLOCK_V)
    else:
        t_row = t_ptr + row * stride_t
        bits_row = bits_ptr + row * stride_bits
        m_s, d_s, m_1, d_1, m_t, d_t, acc_t, m_r, d_r = _lse_pass(
            z_row, t_row, bits_row, cols, V, inv_t, TEACHER, T_IS_ONE, BLOCK_V
        )
        # Log-sum-exps stay split as (max m, log Σ e^{x−m}) and log-probabilities are formed as
        # (x − m) − log Σ, the order torch's log_softmax rounds in; m + log Σ would round to ulp(|lse|).
        ld_s = tl.log(d_s)
        if T_IS_ONE:
            m_1 = m_s
            ld_1 = ld_s
        else:
            ld_1 = tl.log(d_1)
        ce = (m_1 - tl.load(z_row + label).to(tl.float32)) + ld_1
        kd = ce * 0.0
        if TEACHER == 1:
            ld_t = tl.log(d_t)
            kd = acc_t / d_t - (m_t - m_s) - (ld_t - ld_s)
        else:
            ld_t = kd  # unused: only the dense teacher's pass 2 reads it
        if TEACHER == 2:
            koffs = tl.arange(0, BLOCK_K)
            kmask = koffs < K
            kd, p, r, ld_r = _sparse_kd(
                z_row,
                idx_ptr + row * stride_k + koffs,
                lp_ptr + row * stride_k + koffs,
                res_ptr + row,
                kmask,
                K,
                V,
                inv_t,
                m_s,
                ld_s,
                m_r,
                d_r,
            )
        tl.store(ce_ptr + row, ce)

        # ---- pass 2: the gradient of coef_kd·KD + coef_ce·CE w.r.t. the logits
        if WRITE_GRAD:
            ckd = tl.load(ckd_ptr + row)
            cce = tl.load(cce_ptr + row)
            # a zero coefficient must give an exact 0 even if that term is not finite (weight-0 rows)
            kd_on = ckd != 0
            ce_on = cce != 0
            ckd_t = ckd * inv_t
            kd_acc = kd * 0.0  # NaN where pass 1's KD is: a NaN row stays NaN
            if TEACHER == 2:
                mass = tl.sum(p, axis=0) + r
                rest_on = (r > 0) & (d_r > 0)
                m_r_ref = tl.where(d_r > 0, m_r, 0.0)
            else:  # unused: only the sparse teacher's pass 2 reads them
                mass, rest_on, m_r_ref, r, ld_r = kd, kd, kd, kd, kd
            kd_acc = _grad_pass(
                z_row,
                t_row,
                bits_row,
                g_row,
                cols,
                label,
                V,
                inv_t,
                kd_on,
                ce_on,
                ckd_t,
                cce,
                kd_acc,
                m_s,
                ld_s,
                m_1,
                ld_1,
                m_t,
                ld_t,
                mass,
                rest_on,
                m_r_ref,
                r,
                ld_r,
                TEACHER,
                T_IS_ONE,
                BLOCK_V,
            )
            if TEACHER == 2:
                # Reloaded rather than kept live through pass 2 (registers): pass 2 never stores to
                # the top-k columns, so z there still holds the logits even when g_ptr == z_ptr.
                _topk_grad(
                    z_row,
                    g_row,
                    idx_ptr + row * stride_k + koffs,
                    lp_ptr + row * stride_k + koffs,
                    kmask,
                    label,
                    inv_t,
                    kd_on,
                    ce_on,
                    ckd_t,
                    cce,
                    m_s,
                    ld_s,
                    m_1,
                    ld_1,
                    mass,
                    T_IS_ONE,
                )
            if TEACHER == 1:
                # pass 1's +inf (teacher mass where the student has −inf) stands: kd_acc is NaN there
                kd = tl.where(kd == float("inf"), kd, kd_acc)
        tl.store(kd_ptr + row, kd)


@triton.jit
def _zero_row(kd_out, ce_out, g_row, cols, V, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """A row labelled ignore_index: KD = CE = 0 and, with WRITE_GRAD, a zero gradient row [V]."""
    tl.store(kd_out, 0.0)
    tl.store(ce_out, 0.0)
    if WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            tl.store(g_row + offs, tl.zeros([BLOCK_V], dtype=g_row.dtype.element_ty), mask=offs < V)


@triton.jit
def _lse_pass(
    z_row, t_row, bits_row, cols, V, inv_t, TEACHER: tl.constexpr, T_IS_ONE: tl.constexpr, BLOCK_V: tl.constexpr
):
    """Pass 1 over the row's [V] logits in tiles of BLOCK_V: running (max, Σ exp) pairs of z/T (m_s, d_s),
    of z (m_1, d_1; skipped when T == 1), of the dense teacher u = t/T (m_t, d_t, with
    acc_t = Σ e^{u − m_t}(u − z/T)) and of z/T outside the top k (m_r, d_r)."""
    neg_inf = float("-inf")
    m_s = neg_inf
    d_s = 0.0
    m_1 = neg_inf
    d_1 = 0.0
    m_t = neg_inf
    d_t = 0.0
    acc_t = 0.0
    m_r = neg_inf
    d_r = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=neg_inf).to(tl.float32)
        s = z * inv_t
        m_s, d_s = _lse_update(m_s, d_s, s)
        if not T_IS_ONE:
            m_1, d_1 = _lse_update(m_1, d_1, z)
        if TEACHER == 1:
            u = tl.load(t_row + offs, mask=mask, other=neg_inf).to(tl.float32) * inv_t
            m_new = tl.maximum(m_t, tl.max(u, axis=0))
            m_ref = tl.where(m_new == neg_inf, 0.0, m_new)
            rescale = tl.exp(m_t - m_ref)
            e = tl.exp(u - m_ref)
            d_t = d_t * rescale + tl.sum(e, axis=0)
            # p = 0 columns add nothing (also where the student has −inf and u − s would be +inf).
            acc_t = acc_t * rescale + tl.sum(tl.where(e > 0, e * (u - s), 0.0), axis=0)
            m_t = m_new
        if TEACHER == 2:
            top = _in_topk(bits_row, offs, mask)
            m_r, d_r = _lse_update(m_r, d_r, tl.where(top != 0, neg_inf, s))
    return m_s, d_s, m_1, d_1, m_t, d_t, acc_t, m_r, d_r


@triton.jit
def _sparse_kd(z_row, idx_row, lp_row, res, kmask, K, V, inv_t, m_s, ld_s, m_r, d_r):
    """KD of the top-k teacher (indices idx_row [BLOCK_K], log-probs lp_row, residual res, kmask the k
    real lanes): Σ_j p_j (lp_j − log q_idx_j) + r (log r − log(1 − Σ_j q_idx_j)). Returns (kd, p, r, ld_r)."""
    neg_inf = float("-inf")
    idx = tl.load(idx_row, mask=kmask, other=0).to(tl.int64)
    lp = tl.load(lp_row, mask=kmask, other=neg_inf).to(tl.float32)
    z_k = tl.load(z_row + idx, mask=kmask, other=neg_inf).to(tl.float32)
    s_k = z_k * inv_t
    p = tl.exp(lp)
    r = tl.load(res).to(tl.float32)
    r = tl.where(K < V, r, 0.0)  # k = V: the bucket has no columns, r is extraction rounding
    ld_r = tl.log(d_r)
    log_rest = (m_r - m_s) + (ld_r - ld_s)  # log(1 − Σ_j q_idx_j); −inf when no column is left
    r_safe = tl.where(r > 0, r, 1.0)
    kd = tl.sum(tl.where(p > 0, p * (lp - ((s_k - m_s) - ld_s)), 0.0), axis=0)
    kd += tl.where(r > 0, r * (tl.log(r_safe) - log_rest), 0.0)  # r log r → 0 as r → 0
    return kd, p, r, ld_r


@triton.jit
def _grad_pass(
    z_row,
    t_row,
    bits_row,
    g_row,
    cols,
    label,
    V,
    inv_t,
    kd_on,
    ce_on,
    ckd_t,
    cce,
    kd_acc,
    m_s,
    ld_s,
    m_1,
    ld_1,
    m_t,
    ld_t,
    mass,
    rest_on,
    m_r_ref,
    r,
    ld_r,
    TEACHER: tl.constexpr,
    T_IS_ONE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Pass 2 over the row's [V] logits: writes the gradient of coef_kd·KD + coef_ce·CE into g_row (every
    column but the top-k ones, which ``_topk_grad`` writes); returns kd_acc plus KD re-summed term by
    term (dense teacher)."""
    neg_inf = float("-inf")
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=neg_inf).to(tl.float32)
        s = z * inv_t
        log_q = (s - m_s) - ld_s
        q = tl.exp(log_q)
        if T_IS_ONE:
            sm = q
        else:
            sm = tl.exp((z - m_1) - ld_1)
        g = tl.where(ce_on, cce * (sm - tl.where(offs == label, 1.0, 0.0)), 0.0)
        smask = mask
        if TEACHER == 1:
            u = tl.load(t_row + offs, mask=mask, other=neg_inf).to(tl.float32) * inv_t
            log_p = (u - m_t) - ld_t
            p_v = tl.exp(log_p)
            g += tl.where(kd_on, ckd_t * (q - p_v), 0.0)
            # KD again, as Σ p (log p − log q) term by term: rounds like torch's kl_div, where
            # pass 1's A/Σe − (m_t − m_s) − (ld_t − ld_s) cancels O(|lse|) terms.
            kd_acc += tl.sum(tl.where(p_v > 0, p_v * (log_p - log_q), 0.0), axis=0)
        if TEACHER == 2:
            rest = tl.where(rest_on, r * tl.exp((s - m_r_ref) - ld_r), 0.0)
            g += tl.where(kd_on, ckd_t * (mass * q - rest), 0.0)
            smask = mask & (_in_topk(bits_row, offs, mask) == 0)
        tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=smask)
    return kd_acc


@triton.jit
def _topk_grad(
    z_row,
    g_row,
    idx_row,
    lp_row,
    kmask,
    label,
    inv_t,
    kd_on,
    ce_on,
    ckd_t,
    cce,
    m_s,
    ld_s,
    m_1,
    ld_1,
    mass,
    T_IS_ONE: tl.constexpr,
):
    """The gradient at the top-k columns idx_row [BLOCK_K]: coef_ce·(softmax(z) − onehot) + coef_kd/T·(P q − p)."""
    neg_inf = float("-inf")
    idx = tl.load(idx_row, mask=kmask, other=0).to(tl.int64)
    p = tl.exp(tl.load(lp_row, mask=kmask, other=neg_inf).to(tl.float32))
    z_k = tl.load(z_row + idx, mask=kmask, other=neg_inf).to(tl.float32)
    s_k = z_k * inv_t
    q_k = tl.exp((s_k - m_s) - ld_s)
    if T_IS_ONE:
        sm_k = q_k
    else:
        sm_k = tl.exp((z_k - m_1) - ld_1)
    g_k = tl.where(ce_on, cce * (sm_k - tl.where(idx == label, 1.0, 0.0)), 0.0)
    g_k += tl.where(kd_on, ckd_t * (mass * q_k - p), 0.0)
    tl.store(g_row + idx, g_k.to(g_row.dtype.element_ty), mask=kmask)
