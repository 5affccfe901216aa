"""In-register M-RoPE for attention tiles (``@triton.jit`` helpers shared by the forward and backward).

A head vector of dim D is handled as two half tiles x1 = x[:, :D/2] and x2 = x[:, D/2:], each padded
to HALF_PAD = next_pow2(D/2) columns (masked), so the rotate-half convention needs no permutation:

    θ[r, j]   = pos[axis(j), token r] · inv_freq[j]      (fp32; axis(j) = t | h | w by mrope_section)
    rotate    (x1, x2) → (x1 cos θ − x2 sin θ,  x2 cos θ + x1 sin θ)
    unrotate  (y1, y2) → (y1 cos θ + y2 sin θ,  y2 cos θ − y1 sin θ)      (rotation by −θ, the transpose)

and QKᵀ of the rotated tiles is q1·k1ᵀ + q2·k2ᵀ.
"""

import triton
import triton.language as tl


@triton.jit
def sincos(theta):
    """(cos θ, sin θ) of fp32 θ with one shared range reduction: a third of the work of tl.cos + tl.sin
    (libdevice), and no slow-path branch to hold registers in the attention loops.

    θ = j·π/2 + r with j = round(θ·2/π), |r| ≤ π/4 (Cody-Waite: π/2 in three parts with few mantissa
    bits, as in Cephes, so j·part is exact for |j| < 2^16 even without FMA, i.e. in the interpreter too);
    minimax polynomials on [−π/4, π/4] (Cephes sinf/cosf coefficients); j mod 4 picks swaps and signs.
    Error ≤ 1e-7 for |θ| < 1e4, ≤ 1e-6 at 1e5; beyond that it grows but stays below the rounding error
    the fp32 angle θ = fl(pos·inv_freq) already carries (ulp(θ)/2 = 0.03 at 1e6), which the
    transformers fp32 rotary shares.
    """
    j = tl.floor(theta * 0.6366197723675814 + 0.5)
    r = theta - j * 1.5703125
    r = r - j * 4.837512969970703125e-4
    r = r - j * 7.549789948768648e-8
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
def rope_cos_sin(POS, tok, tok_ok, n_tokens, freq, cols, s_t, s_th):
    """cos θ, sin θ as fp32 [BLOCK, HALF_PAD] tiles.

    POS: int positions [3, n_tokens] (rows t, h, w), already offset to the sequence start;
    tok: [BLOCK] token offsets in the sequence;
    freq: fp32 [HALF_PAD] inverse frequencies (0 in the padding); cols: [HALF_PAD] column ids;
    s_t, s_th: first column of the h section and of the w section.
    """
    p_t = tl.load(POS + tok, mask=tok_ok, other=0).to(tl.float32)
    p_h = tl.load(POS + n_tokens + tok, mask=tok_ok, other=0).to(tl.float32)
    p_w = tl.load(POS + 2 * n_tokens + tok, mask=tok_ok, other=0).to(tl.float32)
    c = cols[None, :]
    pos = tl.where(c < s_t, p_t[:, None], tl.where(c < s_th, p_h[:, None], p_w[:, None]))
    return sincos(pos * freq[None, :])


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
def load_rotated(ptr_rows, row_ok, POS, tok, n_tokens, freq, cols, s_t, s_th, HALF: tl.constexpr):
    """Load the two halves of a Q or K tile and rotate them by their tokens' angles (fp32 tiles)."""
    x1, x2 = load_halves(ptr_rows, row_ok, cols, HALF)
    cos, sin = rope_cos_sin(POS, tok, row_ok, n_tokens, freq, cols, s_t, s_th)
    return rotate(x1.to(tl.float32), x2.to(tl.float32), cos, sin)


@triton.jit
def store_unrotated(ptr_rows, row_ok, g1, g2, POS, tok, n_tokens, freq, cols, s_t, s_th, HALF: tl.constexpr):
    """Rotate the gradient halves (w.r.t. rotated vectors) by −θ and store them in the output's dtype."""
    cos, sin = rope_cos_sin(POS, tok, row_ok, n_tokens, freq, cols, s_t, s_th)
    d1, d2 = unrotate(g1, g2, cos, sin)
    ok = row_ok[:, None] & (cols[None, :] < HALF)
    ty = ptr_rows.dtype.element_ty
    tl.store(ptr_rows[:, None] + cols[None, :], d1.to(ty), mask=ok)
    tl.store(ptr_rows[:, None] + HALF + cols[None, :], d2.to(ty), mask=ok)
