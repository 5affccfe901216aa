"""Triton code of the M-RoPE rotation: the one home of the rotary math of every kernel.

Helpers (``@triton.jit``, inlined where they are called): ``sincos`` (the fp32 sine and cosine),
``rope_cos_sin`` (angles of a tile of tokens), ``rotate`` / ``unrotate``, and the tile loaders and
stores the attention forward and backward use. ``mrope_rotate_kernel`` is ``apply_mrope``'s kernel,
which also rotates the keys the patched model writes to its KV cache; so the cache holds keys
rotated by the same sin/cos as the keys the fused attention rotates in registers.

A head vector of dim D is handled as two half tiles x1 = x[..., :D/2] and x2 = x[..., D/2:], each
padded to HALF_PAD = next_pow2(D/2) columns (masked), so the rotate-half convention needs no
permutation:

    θ_j       = pos[axis(j)] · inv_freq[j]      (fp32; axis(j) ∈ {0 t, 1 h, 2 w} read from the int32
                                                  [D/2] layout vector: contiguous or interleaved sections)
    rotate    (x1, x2) → (x1 cos θ − x2 sin θ,  x2 cos θ + x1 sin θ)
    unrotate  (y1, y2) → (y1 cos θ + y2 sin θ,  y2 cos θ − y1 sin θ)   (by −θ: the transpose, i.e. the backward)

and QKᵀ of rotated tiles is q1·k1ᵀ + q2·k2ᵀ. The layout vector is loaded once per program, like
inv_freq (``load_freq_axis``), and picks each column's position with two selects, the cost the
section bounds had; so one compiled kernel serves every layout.

``mrope_rotate_kernel``: one program handles one token (grid axis 0: sequence, axis 1: batch) and a
share of its heads (axis 2 splits the heads when there are too few tokens to fill the GPU). It
loads the token's three positions, computes the D/2 angles once and applies them to every q head
and every k head of the token, a block of heads at a time, scaled by ``attention_scaling`` (sin
negated for the backward). No cos/sin table is read or written: the op moves exactly q, k in and
q', k' out.
"""

import triton
import triton.language as tl


@triton.jit
def sincos(theta):
    """(cos θ, sin θ) of fp32 θ with one shared range reduction: a third of the work of tl.cos + tl.sin
    (libdevice), and no slow-path branch to hold registers in the attention loops.

    θ = j·π/2 + r with j = round(θ·2/π), |r| ≤ π/4, by Cody-Waite: π/2 = P1 + P2 + P3 + P4 (+ 6e-17),
    each part with at most 12 significant bits, and j = jh + jl with jh a multiple of 4096 of j's sign
    and |jl| < 4096, so every product jh·Pi, jl·Pi is exact in fp32 for |j| < 2^24 even without FMA (in
    the interpreter too) and the subtractions lose nothing but the last rounding. Then minimax
    polynomials on [−π/4, π/4] (Cephes sinf/cosf coefficients); j mod 4 picks swaps and signs.
    Error ≤ 2e-7 against cos/sin of the same fp32 θ for every |θ| < 1.5·10^6 (positions up to 1.5·10^6
    at inv_freq 1; the tests measure it over that range), ≤ 6e-7 at 3·10^6. Beyond 2^20 the fp32
    product θ·2/π rounds by up to 1/8, j can be off by one and r leaves [−π/4, π/4], where the
    polynomials slowly lose accuracy.
    """
    j = tl.floor(theta * 0.6366197723675814 + 0.5)
    jh = (j * 0.000244140625).to(tl.int32).to(tl.float32) * 4096.0  # truncated: jh = 0 for |j| < 4096
    jl = j - jh
    r = theta - jh * 1.5703125
    r = r - jl * 1.5703125
    r = r - jh * 4.837512969970703125e-4
    r = r - jl * 4.837512969970703125e-4
    r = r - jh * 7.549533620476722717e-8
    r = r - jl * 7.549533620476722717e-8
    r = r - j * 2.563282919254561421e-12  # j·P4 is below 5e-5: its rounding is far under r's ulp
    z = r * r
    sin_r = r + r * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4))
    cos_r = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5))
    quadrant = j.to(tl.int32) & 3
    swap = (quadrant & 1) != 0
    cos_v = tl.where(swap, sin_r, cos_r)
    sin_v = tl.where(swap, cos_r, sin_r)
    cos_v = tl.where((quadrant == 1) | (quadrant == 2), -cos_v, cos_v)
    sin_v = tl.where(quadrant >= 2, -sin_v, sin_v)
    return cos_v, sin_v


@triton.jit
def load_freq_axis(FREQ, AXIS, cols, HALF: tl.constexpr):
    """inv_freq fp32 [HALF_PAD] (0 in the padding) and the position row of each column, int32 [HALF_PAD]."""
    ok = cols < HALF
    return tl.load(FREQ + cols, mask=ok, other=0.0), tl.load(AXIS + cols, mask=ok, other=0)


@triton.jit
def select_axis(axis, p_t, p_h, p_w):
    """[BLOCK, HALF_PAD] positions: column j takes row axis[j] of the [BLOCK] positions p_t, p_h, p_w."""
    a = axis[None, :]
    return tl.where(a == 0, p_t[:, None], tl.where(a == 1, p_h[:, None], p_w[:, None]))


@triton.jit
def rope_cos_sin(POS, tok, tok_ok, n_tokens, freq, axis):
    """cos θ, sin θ as fp32 [BLOCK, HALF_PAD] tiles.

    POS: int positions [3, n_tokens] (rows t, h, w), already offset to the sequence start;
    tok: [BLOCK] token offsets in the sequence;
    freq, axis: [HALF_PAD] inverse frequencies and position rows (``load_freq_axis``).
    """
    p_t = tl.load(POS + tok, mask=tok_ok, other=0).to(tl.float32)
    p_h = tl.load(POS + n_tokens + tok, mask=tok_ok, other=0).to(tl.float32)
    p_w = tl.load(POS + 2 * n_tokens + tok, mask=tok_ok, other=0).to(tl.float32)
    return sincos(select_axis(axis, p_t, p_h, p_w) * freq[None, :])


@triton.jit
def rotate(x1, x2, cos, sin):
    """Rotate the half tiles (fp32 math) by +θ."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def unrotate(y1, y2, cos, sin):
    """Rotate the half tiles by −θ: maps gradients w.r.t. rotated vectors to the pre-rotary ones."""
    return y1 * cos + y2 * sin, y2 * cos - y1 * sin


@triton.jit
def load_halves(ptr_rows, row_ok, cols, HALF: tl.constexpr):
    """Load x[:, :HALF] and x[:, HALF:2*HALF] for the row pointers ``ptr_rows`` [BLOCK] (0 in the padding)."""
    ok = row_ok[:, None] & (cols[None, :] < HALF)
    x1 = tl.load(ptr_rows[:, None] + cols[None, :], mask=ok, other=0.0)
    x2 = tl.load(ptr_rows[:, None] + HALF + cols[None, :], mask=ok, other=0.0)
    return x1, x2


@triton.jit
def store_halves(ptr_rows, row_ok, x1, x2, cols, HALF: tl.constexpr):
    """Store the half tiles x1, x2 (already in the destination's dtype) as x[:, :HALF], x[:, HALF:2*HALF]."""
    ok = row_ok[:, None] & (cols[None, :] < HALF)
    tl.store(ptr_rows[:, None] + cols[None, :], x1, mask=ok)
    tl.store(ptr_rows[:, None] + HALF + cols[None, :], x2, mask=ok)


@triton.jit
def load_rotated(ptr_rows, row_ok, POS, tok, n_tokens, freq, axis, cols, HALF: tl.constexpr):
    """Load the two halves of a Q or K tile and rotate them by their tokens' angles (fp32 tiles)."""
    x1, x2 = load_halves(ptr_rows, row_ok, cols, HALF)
    cos, sin = rope_cos_sin(POS, tok, row_ok, n_tokens, freq, axis)
    return rotate(x1.to(tl.float32), x2.to(tl.float32), cos, sin)


@triton.jit
def store_unrotated(ptr_rows, row_ok, g1, g2, POS, tok, n_tokens, freq, axis, cols, HALF: tl.constexpr):
    """Rotate the gradient halves (w.r.t. rotated vectors) by −θ and store them in the output's dtype."""
    cos, sin = rope_cos_sin(POS, tok, row_ok, n_tokens, freq, axis)
    d1, d2 = unrotate(g1, g2, cos, sin)
    ty = ptr_rows.dtype.element_ty
    store_halves(ptr_rows, row_ok, d1.to(ty), d2.to(ty), cols, HALF)


@triton.jit
def rotate_heads(
    x_ptr,
    o_ptr,
    n_heads,
    sx_b,
    sx_s,
    sx_h,
    so_b,
    so_s,
    so_h,
    b,
    s,
    split,
    n_split,
    cos,
    sin,
    j,
    j_ok,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Rotate heads split, split + n_split, ... (in blocks of BLOCK_H) of token (b, s): x → o."""
    h = tl.arange(0, BLOCK_H)
    for h0 in range(split * BLOCK_H, n_heads, n_split * BLOCK_H):
        heads = (h0 + h)[:, None]
        m = (heads < n_heads) & j_ok[None, :]
        src = x_ptr + b * sx_b + s * sx_s + heads.to(tl.int64) * sx_h + j[None, :]
        dst = o_ptr + b * so_b + s * so_s + heads.to(tl.int64) * so_h + j[None, :]
        x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        y1, y2 = rotate(x1, x2, cos, sin)
        tl.store(dst, y1.to(o_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF, y2.to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def mrope_rotate_kernel(
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    pos_ptr,
    inv_freq_ptr,
    axis_ptr,
    Hq,
    Hkv,
    sq_b,
    sq_s,
    sq_h,
    sk_b,
    sk_s,
    sk_h,
    sqo_b,
    sqo_s,
    sqo_h,
    sko_b,
    sko_s,
    sko_h,
    sp_a,
    sp_b,
    sp_s,
    scale,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    INVERSE: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    n_split = tl.num_programs(2)

    # Angles for this token, fp32, computed once and shared by all its heads.
    p = pos_ptr + b * sp_b + s * sp_s
    pos_t = tl.load(p).to(tl.float32)
    pos_h = tl.load(p + sp_a).to(tl.float32)
    pos_w = tl.load(p + 2 * sp_a).to(tl.float32)
    j = tl.arange(0, HALF_PAD)
    j_ok = j < HALF
    inv_freq, axis = load_freq_axis(inv_freq_ptr, axis_ptr, j, HALF)
    theta = tl.where(axis == 0, pos_t, tl.where(axis == 1, pos_h, pos_w)) * inv_freq
    cos, sin = sincos(theta)
    cos = (cos * scale)[None, :]
    sin = (sin * scale)[None, :]
    if INVERSE:
        sin = -sin

    rotate_heads(
        q_ptr,
        qo_ptr,
        Hq,
        sq_b,
        sq_s,
        sq_h,
        sqo_b,
        sqo_s,
        sqo_h,
        b,
        s,
        split,
        n_split,
        cos,
        sin,
        j,
        j_ok,
        HALF,
        BLOCK_HQ,
    )
    rotate_heads(
        k_ptr,
        ko_ptr,
        Hkv,
        sk_b,
        sk_s,
        sk_h,
        sko_b,
        sko_s,
        sko_h,
        b,
        s,
        split,
        n_split,
        cos,
        sin,
        j,
        j_ok,
        HALF,
        BLOCK_HK,
    )
