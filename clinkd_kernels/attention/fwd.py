"""Forward kernel: FlashAttention-2 online softmax with Q and K rotated in registers.

Layout (all contiguous): tokens are flattened, T_total = B·S (padded form) or T (packed form).
    Q [T_total, HQ, D], K/V [T_total, HKV, D], O [T_total, HQ, D], LSE fp32 [HQ, T_total],
    POS int [3, T_total], FREQ fp32 [D/2] and AXIS int32 [D/2] (the rotary layout),
    MASK int8 [T_total] (padded form, 1 keep / 0 pad), CU int32 [B+1] (packed).
One program = BLOCK_M query rows of one head of one sequence; grid (cdiv(max_len, BLOCK_M), HQ, B);
``seq_bucket`` (the next power of two of the longest sequence) only keys the autotuner.
Q is rotated once per program as it is loaded; K tiles are rotated in registers as they are loaded
(default), or read from a copy of k rotated once up front by ``apply_mrope``'s kernel (K_ROTATED: K
holds k already rotated; see launch.py): the in-loop rotation costs per-element sin/cos on every key
tile of every query block and head, fp32 work of the order of the tile's matmuls. Both use the rotary
helpers of ``clinkd_kernels/rope/kernels.py``.

Math per query row i (scores in base 2, c = softmax_scale·log2 e):
    s_j = c · q_rot,i · k_rot,j                masked to −inf (causal j > i, padded key, j ≥ len)
    m = max_j s_j,  l = Σ_j 2^(s_j − m),  o_i = Σ_j 2^(s_j − m) v_j / l,  LSE_i = m + log2 l
kept as running (m, l, acc) over key blocks. Padded query rows give o = 0 and LSE = +inf, which
makes every backward term of theirs exactly 0.
"""

import triton
import triton.language as tl

from ..rope.kernels import load_freq_axis, load_halves, load_rotated


@triton.jit
def seq_bounds(CU, b, seqlen, VARLEN: tl.constexpr):
    """(first flat token, length) of sequence ``b``."""
    if VARLEN:
        start = tl.load(CU + b)
        length = tl.load(CU + b + 1) - start
    else:
        start = b * seqlen
        length = seqlen
    return start.to(tl.int64), length


@triton.jit
def mm(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b; IEEE keeps fp32 inputs exact instead of TF32 (fp16/bf16 ignore it)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def mcg_attn_fwd_kernel(
    Q,
    K,
    V,
    POS,
    FREQ,
    AXIS,
    MASK,
    CU,
    O,
    LSE,
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
    K_ROTATED: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    b = tl.program_id(2)
    h = tl.program_id(1)
    start, length = seq_bounds(CU, b, seqlen, VARLEN)
    # Heaviest causal blocks first: the last query block has the most keys.
    m_start = (tl.cdiv(length, BLOCK_M) - 1 - tl.program_id(0)) * BLOCK_M
    if m_start < 0:
        return
    hk = h // GROUP
    q_tok_stride = HQ * HEAD_DIM
    kv_tok_stride = (HQ // GROUP) * HEAD_DIM
    # 64-bit scalar bases of this sequence and head; per-row offsets below stay 32-bit (fewer registers).
    Q += start * q_tok_stride + h * HEAD_DIM
    O += start * q_tok_stride + h * HEAD_DIM
    K += start * kv_tok_stride + hk * HEAD_DIM
    V += start * kv_tok_stride + hk * HEAD_DIM
    POS += start
    if HAS_MASK:
        MASK += start
    LSE += h.to(tl.int64) * n_tokens + start

    offs_m = m_start + tl.arange(0, BLOCK_M)
    m_ok = offs_m < length
    cols = tl.arange(0, HALF_PAD)
    dcols = tl.arange(0, D_PAD)
    freq, axis = load_freq_axis(FREQ, AXIS, cols, HALF)

    q1, q2 = load_rotated(Q + offs_m * q_tok_stride, m_ok, POS, offs_m, n_tokens, freq, axis, cols, HALF)
    dtype = Q.dtype.element_ty
    q1, q2 = q1.to(dtype), q2.to(dtype)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 is the native instruction

    # The running max starts finite, so a fully masked block gives 2^(-inf - m) = 0 rather than NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    n_end = tl.minimum(length, m_start + BLOCK_M) if CAUSAL else length
    for n_start in range(0, n_end, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < length
        k_rows = K + offs_n * kv_tok_stride
        if K_ROTATED:
            k1, k2 = load_halves(k_rows, n_ok, cols, HALF)
        else:
            k1, k2 = load_rotated(k_rows, n_ok, POS, offs_n, n_tokens, freq, axis, cols, HALF)
        s = mm(q1, tl.trans(k1.to(dtype)), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE)
        s = mm(q2, tl.trans(k2.to(dtype)), s, IEEE)
        keep = n_ok[None, :]
        if HAS_MASK:
            keep = keep & (tl.load(MASK + offs_n, mask=n_ok, other=0) != 0)[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(keep, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            (V + offs_n * kv_tok_stride)[:, None] + dcols[None, :],
            mask=n_ok[:, None] & (dcols[None, :] < HEAD_DIM),
            other=0.0,
        )
        acc = acc * alpha[:, None]
        acc = mm(p.to(dtype), v, acc, IEEE)
        m_i = m_new

    row_ok = l_i > 0
    if HAS_MASK:
        row_ok = row_ok & (tl.load(MASK + offs_m, mask=m_ok, other=0) != 0)
    out = acc / tl.where(row_ok, l_i, 1.0)[:, None]
    out = tl.where(row_ok[:, None], out, 0.0)
    lse = tl.where(row_ok, m_i + tl.log2(tl.where(row_ok, l_i, 1.0)), float("inf"))
    tl.store(
        (O + offs_m * q_tok_stride)[:, None] + dcols[None, :],
        out.to(dtype),
        mask=m_ok[:, None] & (dcols[None, :] < HEAD_DIM),
    )
    tl.store(LSE + offs_m, lse, mask=m_ok)
