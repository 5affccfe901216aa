"""Backward kernels: a preprocess (δ, rotated q/k), dK/dV per key block, dQ per query block. No atomics.

Same flattened layout as ``fwd.py``; dQ [T_total, HQ, D], dK/dV [T_total, HKV, D], DELTA fp32 [HQ, T_total],
QR/KR: q, k rotated once by the preprocess (input dtype, by the same code as the forward's in-register
rotation, so P is recomputed as the forward saw it, up to rounding). With s_ij = c·q_rot,i·k_rot,j
(c = scale·log2 e) and the saved base-2 LSE:

    p_ij   = 2^(s_ij − LSE_i)                   (0 where masked; LSE = +inf on padded rows)
    δ_i    = Σ_d dO_id · O_id
    dV_j   = Σ_i p_ij dO_i                      (summed over the query heads of the KV head's group)
    dS_ij  = p_ij (dO_i · v_j − δ_i)
    dk_rot,j = scale Σ_i dS_ij q_rot,i,   dq_rot,i = scale Σ_j dS_ij k_rot,j

and dq, dk are dq_rot, dk_rot rotated by −θ (gradients for the pre-rotary q, k), done by a finishing
kernel that reads the fp32 dq_rot/dk_rot. Why the rotations sit in a preprocess and a finish pass
instead of in the loops as in the forward: here every (key block, query block) pair would re-rotate
a tile (per-element sin/cos work of the order of the matmuls), and sin/cos tiles live next to the
accumulators (even an epilogue rotation spills). The transient buffers cost (Hq + Hkv)·D·(2 + 4)
bytes per token (bf16/fp16), freed when the backward returns.
"""

import triton
import triton.language as tl

from ..rope.kernels import load_freq_axis, load_halves, load_rotated, store_halves, store_unrotated
from .fwd import mm, seq_bounds


@triton.jit
def mcg_attn_bwd_prep_kernel(
    Q,
    K,
    O,
    DO,
    POS,
    FREQ,
    AXIS,
    QR,
    KR,
    DELTA,
    n_tokens,
    HQ,
    HKV,
    HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid (cdiv(T_total, BLOCK), HQ + HKV). Programs h < HQ: QR[:, h] = rope(q[:, h]) and
    δ[h] = rowsum(dO·O) (fp32); programs h ≥ HQ: KR[:, h − HQ] = rope(k[:, h − HQ])."""
    HALF: tl.constexpr = HEAD_DIM // 2
    h = tl.program_id(1)
    tok = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = tok < n_tokens
    cols = tl.arange(0, HALF_PAD)
    freq, axis = load_freq_axis(FREQ, AXIS, cols, HALF)
    row = tok.to(tl.int64)
    if h < HQ:
        src = Q + row * (HQ * HEAD_DIM) + h * HEAD_DIM
        dst = QR + row * (HQ * HEAD_DIM) + h * HEAD_DIM
        d = tl.arange(0, D_PAD)
        m = ok[:, None] & (d[None, :] < HEAD_DIM)
        o = tl.load((O + row * (HQ * HEAD_DIM) + h * HEAD_DIM)[:, None] + d[None, :], mask=m, other=0.0)
        do = tl.load((DO + row * (HQ * HEAD_DIM) + h * HEAD_DIM)[:, None] + d[None, :], mask=m, other=0.0)
        tl.store(DELTA + h.to(tl.int64) * n_tokens + tok, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)
    else:
        src = K + row * (HKV * HEAD_DIM) + (h - HQ) * HEAD_DIM
        dst = KR + row * (HKV * HEAD_DIM) + (h - HQ) * HEAD_DIM
    x1, x2 = load_rotated(src, ok, POS, tok, n_tokens, freq, axis, cols, HALF)
    ty = QR.dtype.element_ty
    store_halves(dst, ok, x1.to(ty), x2.to(ty), cols, HALF)


@triton.jit
def mcg_attn_bwd_dkdv_kernel(
    QR,
    KR,
    V,
    MASK,
    CU,
    DO,
    LSE,
    DELTA,
    DKR,
    DV,
    sm_scale,
    seqlen,
    n_tokens,
    HQ,
    GROUP,
    seq_bucket,
    HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
    IEEE: tl.constexpr,
):
    """dk_rot (fp32), dV for BLOCK_N keys of one KV head: loops over the group's query heads and query blocks.
    Grid (cdiv(max_len, BLOCK_N), HKV, B)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    b = tl.program_id(2)
    hk = tl.program_id(1)
    start, length = seq_bounds(CU, b, seqlen, VARLEN)
    n_start = tl.program_id(0) * BLOCK_N
    if n_start >= length:
        return
    q_tok_stride = HQ * HEAD_DIM
    kv_tok_stride = (HQ // GROUP) * HEAD_DIM
    dtype = KR.dtype.element_ty
    # 64-bit scalar bases of this sequence; per-row offsets stay 32-bit.
    QR += start * q_tok_stride
    DO += start * q_tok_stride
    KR += start * kv_tok_stride + hk * HEAD_DIM
    V += start * kv_tok_stride + hk * HEAD_DIM
    DKR += start * kv_tok_stride + hk * HEAD_DIM
    DV += start * kv_tok_stride + hk * HEAD_DIM
    if HAS_MASK:
        MASK += start
    LSE += start
    DELTA += start

    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < length
    cols = tl.arange(0, HALF_PAD)
    dcols = tl.arange(0, D_PAD)
    k1, k2 = load_halves(KR + offs_n * kv_tok_stride, n_ok, cols, HALF)
    v = tl.load(
        (V + offs_n * kv_tok_stride)[:, None] + dcols[None, :],
        mask=n_ok[:, None] & (dcols[None, :] < HEAD_DIM),
        other=0.0,
    )
    key_ok = n_ok
    if HAS_MASK:
        key_ok = key_ok & (tl.load(MASK + offs_n, mask=n_ok, other=0) != 0)
    qk_scale = sm_scale * 1.4426950408889634

    dk1 = tl.zeros([BLOCK_N, HALF_PAD], tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    if CAUSAL:
        m_lo = (n_start // BLOCK_M) * BLOCK_M  # earlier query blocks see none of these keys
    else:
        m_lo = 0
    for g in range(0, GROUP):
        h = hk * GROUP + g
        QR_h = QR + h * HEAD_DIM
        DO_h = DO + h * HEAD_DIM
        LSE_h = LSE + h.to(tl.int64) * n_tokens
        DELTA_h = DELTA + h.to(tl.int64) * n_tokens
        for m_start in range(m_lo, length, BLOCK_M):
            offs_m = m_start + tl.arange(0, BLOCK_M)
            m_ok = offs_m < length
            q1, q2 = load_halves(QR_h + offs_m * q_tok_stride, m_ok, cols, HALF)
            do = tl.load(
                (DO_h + offs_m * q_tok_stride)[:, None] + dcols[None, :],
                mask=m_ok[:, None] & (dcols[None, :] < HEAD_DIM),
                other=0.0,
            )
            lse = tl.load(LSE_h + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA_h + offs_m, mask=m_ok, other=0.0)
            # Transposed scores sT [BLOCK_N, BLOCK_M], so dK/dV accumulate without a transpose.
            st = mm(k1, tl.trans(q1), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), IEEE)
            st = mm(k2, tl.trans(q2), st, IEEE)
            keep = key_ok[:, None]
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            pt = tl.where(keep, tl.exp2(st * qk_scale - lse[None, :]), 0.0)
            dv = mm(pt.to(dtype), do, dv, IEEE)
            dpt = mm(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), IEEE)
            dst = (pt * (dpt - delta[None, :])).to(dtype)
            dk1 = mm(dst, q1, dk1, IEEE)
            dk2 = mm(dst, q2, dk2, IEEE)

    store_halves(DKR + offs_n * kv_tok_stride, n_ok, dk1 * sm_scale, dk2 * sm_scale, cols, HALF)
    tl.store(
        (DV + offs_n * kv_tok_stride)[:, None] + dcols[None, :],
        dv.to(dtype),
        mask=n_ok[:, None] & (dcols[None, :] < HEAD_DIM),
    )


@triton.jit
def mcg_attn_bwd_dq_kernel(
    QR,
    KR,
    V,
    MASK,
    CU,
    DO,
    LSE,
    DELTA,
    DQR,
    sm_scale,
    seqlen,
    n_tokens,
    HQ,
    GROUP,
    seq_bucket,
    HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
    IEEE: tl.constexpr,
):
    """dq_rot (fp32) for BLOCK_M query rows of one head: loops over key blocks, recomputing P.
    Grid (cdiv(max_len, BLOCK_M), HQ, B)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    b = tl.program_id(2)
    h = tl.program_id(1)
    start, length = seq_bounds(CU, b, seqlen, VARLEN)
    m_start = (tl.cdiv(length, BLOCK_M) - 1 - tl.program_id(0)) * BLOCK_M
    if m_start < 0:
        return
    hk = h // GROUP
    q_tok_stride = HQ * HEAD_DIM
    kv_tok_stride = (HQ // GROUP) * HEAD_DIM
    dtype = QR.dtype.element_ty
    # 64-bit scalar bases of this sequence and head; per-row offsets stay 32-bit.
    QR += start * q_tok_stride + h * HEAD_DIM
    DO += start * q_tok_stride + h * HEAD_DIM
    DQR += start * q_tok_stride + h * HEAD_DIM
    KR += start * kv_tok_stride + hk * HEAD_DIM
    V += start * kv_tok_stride + hk * HEAD_DIM
    if HAS_MASK:
        MASK += start
    LSE += h.to(tl.int64) * n_tokens + start
    DELTA += h.to(tl.int64) * n_tokens + start

    offs_m = m_start + tl.arange(0, BLOCK_M)
    m_ok = offs_m < length
    cols = tl.arange(0, HALF_PAD)
    dcols = tl.arange(0, D_PAD)
    q1, q2 = load_halves(QR + offs_m * q_tok_stride, m_ok, cols, HALF)
    do = tl.load(
        (DO + offs_m * q_tok_stride)[:, None] + dcols[None, :],
        mask=m_ok[:, None] & (dcols[None, :] < HEAD_DIM),
        other=0.0,
    )
    lse = tl.load(LSE + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634

    dq1 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    if CAUSAL:
        n_end = tl.minimum(length, m_start + BLOCK_M)
    else:
        n_end = length
    for n_start in range(0, n_end, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < length
        k1, k2 = load_halves(KR + offs_n * kv_tok_stride, n_ok, cols, HALF)
        v = tl.load(
            (V + offs_n * kv_tok_stride)[:, None] + dcols[None, :],
            mask=n_ok[:, None] & (dcols[None, :] < HEAD_DIM),
            other=0.0,
        )
        s = mm(q1, tl.trans(k1), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE)
        s = mm(q2, tl.trans(k2), s, IEEE)
        keep = n_ok[None, :]
        if HAS_MASK:
            keep = keep & (tl.load(MASK + offs_n, mask=n_ok, other=0) != 0)[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(keep, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = mm(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE)
        ds = (p * (dp - delta[:, None])).to(dtype)
        dq1 = mm(ds, k1, dq1, IEEE)
        dq2 = mm(ds, k2, dq2, IEEE)

    store_halves(DQR + offs_m * q_tok_stride, m_ok, dq1 * sm_scale, dq2 * sm_scale, cols, HALF)


@triton.jit
def mcg_attn_bwd_finish_kernel(
    DQR,
    DKR,
    POS,
    FREQ,
    AXIS,
    DQ,
    DK,
    n_tokens,
    HQ,
    HKV,
    HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid (cdiv(T_total, BLOCK), HQ + HKV): dq = rope⁻¹(dq_rot), dk = rope⁻¹(dk_rot) in the input dtype."""
    HALF: tl.constexpr = HEAD_DIM // 2
    h = tl.program_id(1)
    tok = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = tok < n_tokens
    cols = tl.arange(0, HALF_PAD)
    freq, axis = load_freq_axis(FREQ, AXIS, cols, HALF)
    row = tok.to(tl.int64)
    if h < HQ:
        src = DQR + row * (HQ * HEAD_DIM) + h * HEAD_DIM
        dst = DQ + row * (HQ * HEAD_DIM) + h * HEAD_DIM
    else:
        src = DKR + row * (HKV * HEAD_DIM) + (h - HQ) * HEAD_DIM
        dst = DK + row * (HKV * HEAD_DIM) + (h - HQ) * HEAD_DIM
    g1, g2 = load_halves(src, ok, cols, HALF)
    store_unrotated(dst, ok, g1, g2, POS, tok, n_tokens, freq, axis, cols, HALF)
