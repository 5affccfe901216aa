"""Plain PyTorch reference of the M-RoPE rotation, written the way transformers' Qwen2-VL does it.

Math, for head dim D, half = D/2, sections (s_t, s_h, s_w) with s_t + s_h + s_w = half:

    axis(j) = which position row (t, h or w) drives frequency j    (j < half; j + half uses axis(j))
        contiguous (Qwen2-VL, Qwen2.5-VL):  t if j < s_t, h if j < s_t + s_h, else w
        interleaved (Qwen3-VL):             h if j ≡ 1 (mod 3) and j < 3·s_h,
                                            w if j ≡ 2 (mod 3) and j < 3·s_w,  else t
    θ_j     = position_ids[axis(j)] · inv_freq[j]                 (fp32)
    (x_j, x_{j+half}) → (x_j cos θ_j − x_{j+half} sin θ_j,  x_{j+half} cos θ_j + x_j sin θ_j)

i.e. ``x·cos + rotate_half(x)·sin`` with cos/sin of length D (the half repeated twice). The
backward is the rotation by −θ. ``attention_scaling`` multiplies cos and sin (transformers' dynamic
rope types use it; 1.0 for Qwen2-VL's default).

θ is the fp32 product pos·inv_freq in every dtype, float64 included: that is the spec (and what
transformers computes for a float64 model). Computing θ itself in float64 would move it by θ·2^-24
(~6e-4 rad at positions ~1e4): a different angle, not a more accurate one. cos, sin and the rotation
then run in float64 for float64 inputs (the tests' reference) and in fp32 otherwise.
"""

from __future__ import annotations

import torch


def rope_axis(mrope_section, interleaved: bool = False) -> torch.Tensor:
    """int64 [D/2]: which position row (0 = t, 1 = h, 2 = w) drives each rotary frequency.

    Contiguous: [0]·s_t + [1]·s_h + [2]·s_w. Interleaved (Qwen3-VL, whose rotary starts from the t
    frequencies and overwrites slots 1, 4, 7, … below 3·s_h with h and 2, 5, 8, … below 3·s_w with w):
    t h w t h w … then t for the rest. Every layout assigns s_t, s_h, s_w frequencies to t, h, w.
    """
    s_t, s_h, s_w = (int(s) for s in mrope_section)
    if not interleaved:
        axis = [0] * s_t + [1] * s_h + [2] * s_w
    else:
        axis = [0] * (s_t + s_h + s_w)
        axis[1 : 3 * s_h : 3] = [1] * len(axis[1 : 3 * s_h : 3])
        axis[2 : 3 * s_w : 3] = [2] * len(axis[2 : 3 * s_w : 3])
    return torch.tensor(axis, dtype=torch.long)


def mrope_cos_sin(
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section,
    *,
    attention_scaling: float = 1.0,
    dtype: torch.dtype = torch.float32,
    interleaved: bool = False,
):
    """cos, sin of shape [*position_ids.shape[1:], D] for position_ids [3, ...] and inv_freq [D/2]
    (θ in fp32; cos and sin in float64 when ``dtype`` is float64, else in fp32, then cast to ``dtype``)."""
    s_t, s_h, s_w = (int(s) for s in mrope_section)
    half = inv_freq.shape[0]
    assert s_t + s_h + s_w == half, "mrope_section must sum to D/2"
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    freqs = position_ids.float().unsqueeze(-1) * inv_freq.float()  # [3, ..., half] fp32
    axis = rope_axis(mrope_section, interleaved).to(freqs.device)
    theta = torch.gather(freqs, 0, axis.expand(freqs.shape[1:]).unsqueeze(0)).squeeze(0).to(compute)  # [..., half]
    emb = torch.cat([theta, theta], dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_mrope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section,
    *,
    attention_scaling: float = 1.0,
    inverse: bool = False,
    mrope_interleaved: bool = False,
):
    """Rotate q [B,S,Hq,D] and k [B,S,Hkv,D] by position_ids [3,B,S] (or q [T,H,D] with [3,T]);
    ``inverse``: by −θ (x·cos − rotate_half(x)·sin, the backward of the rotation);
    ``mrope_interleaved``: the frequency layout of ``rope_axis``.

    Computed in fp32 for fp32/fp16/bf16 inputs and cast back to their dtype (the kernels' precision;
    transformers' own rotary instead rounds cos/sin to the activation dtype and rotates in it, which is
    less accurate in fp16/bf16), in float64 for float64 inputs (the tests' reference; θ stays the fp32
    product).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    cos, sin = mrope_cos_sin(
        position_ids,
        inv_freq,
        mrope_section,
        attention_scaling=attention_scaling,
        dtype=compute,
        interleaved=mrope_interleaved,
    )
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    if inverse:
        sin = -sin
    qc, kc = q.to(compute), k.to(compute)
    q_rot = qc * cos + rotate_half(qc) * sin
    k_rot = kc * cos + rotate_half(kc) * sin
    return q_rot.to(q.dtype), k_rot.to(k.dtype)
