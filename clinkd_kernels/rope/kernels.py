"""Triton kernel for the M-RoPE rotation of q and k (forward, and backward as the inverse rotation).

One program handles one token (grid axis 0: sequence, axis 1: batch) and a share of its heads
(axis 2 splits the heads when there are too few tokens to fill the GPU). It loads the token's three
positions, computes the D/2 angles once in fp32,

    θ_j = pos[axis(j)] · inv_freq[j],   axis(j) = t (j < s_t), h (j < s_t + s_h), w (otherwise)

and applies them to every q head and every k head of the token, a block of heads at a time:

    (x_j, x_{j+D/2}) → (x_j c − x_{j+D/2} s,  x_{j+D/2} c + x_j s),   c = scale·cos θ_j, s = ±scale·sin θ_j

s takes the minus sign for the backward (the adjoint of a rotation is the rotation by −θ). No
cos/sin table is read or written: the op moves exactly q, k in and q', k' out.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..aot import KernelSpec, pointer


@triton.jit
def _rotate_heads(x_ptr, o_ptr, n_heads, sx_b, sx_s, sx_h, so_b, so_s, so_h, b, s, split, n_split, cos, sin, j, j_ok,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate heads split, split + n_split, ... (in blocks of BLOCK_H) of token (b, s): x → o."""
    h = tl.arange(0, BLOCK_H)
    for h0 in range(split * BLOCK_H, n_heads, n_split * BLOCK_H):
        heads = (h0 + h)[:, None]
        m = (heads < n_heads) & j_ok[None, :]
        src = x_ptr + b * sx_b + s * sx_s + heads.to(tl.int64) * sx_h + j[None, :]
        dst = o_ptr + b * so_b + s * so_s + heads.to(tl.int64) * so_h + j[None, :]
        x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        tl.store(dst, (x1 * cos - x2 * sin).to(o_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF, (x2 * cos + x1 * sin).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _mrope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, inv_freq_ptr,
                  Hq, Hkv,
                  sq_b, sq_s, sq_h, sk_b, sk_s, sk_h,
                  sqo_b, sqo_s, sqo_h, sko_b, sko_s, sko_h,
                  sp_a, sp_b, sp_s,
                  scale,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr, SEC_T: tl.constexpr, SEC_TH: tl.constexpr,
                  BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, INVERSE: tl.constexpr):
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
    inv_freq = tl.load(inv_freq_ptr + j, mask=j_ok, other=0.0)
    theta = tl.where(j < SEC_T, pos_t, tl.where(j < SEC_TH, pos_h, pos_w)) * inv_freq
    cos = (tl.cos(theta) * scale)[None, :]
    sin = (tl.sin(theta) * scale)[None, :]
    if INVERSE:
        sin = -sin

    _rotate_heads(q_ptr, qo_ptr, Hq, sq_b, sq_s, sq_h, sqo_b, sqo_s, sqo_h, b, s, split, n_split, cos, sin, j, j_ok,
                  HALF, BLOCK_HQ)
    _rotate_heads(k_ptr, ko_ptr, Hkv, sk_b, sk_s, sk_h, sko_b, sko_s, sko_h, b, s, split, n_split, cos, sin, j, j_ok,
                  HALF, BLOCK_HK)


_MAX_GRID_YZ = 65535


def launch_config(half: int, hq: int, hkv: int) -> dict:
    """Block sizes: about 1024 elements per half-tile (8 fp32 values per thread at 4 warps)."""
    half_pad = triton.next_power_of_2(half)
    cap = max(1, 1024 // half_pad)
    return dict(HALF_PAD=half_pad, BLOCK_HQ=min(cap, triton.next_power_of_2(hq)),
                BLOCK_HK=min(cap, triton.next_power_of_2(hkv)), num_warps=4)


def mrope_rotate_triton(q, k, q_out, k_out, position_ids, inv_freq, mrope_section, scale: float,
                        inverse: bool, *, split: int | None = None) -> None:
    """Write the rotation of q [B,S,Hq,D], k [B,S,Hkv,D] (last dim contiguous) into q_out, k_out.

    position_ids [3,B,S] (any strides, int32/int64); inv_freq [D/2] fp32 contiguous.
    ``split`` (heads per token spread over that many programs) defaults to 1 when B·S alone gives
    enough programs, else enough to give each program one block of q heads.
    """
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    half = D // 2
    s_t, s_h, _ = (int(x) for x in mrope_section)
    cfg = launch_config(half, Hq, Hkv)
    if split is None:
        blocks = max(triton.cdiv(Hq, cfg["BLOCK_HQ"]), triton.cdiv(Hkv, cfg["BLOCK_HK"]))
        split = 1 if B * S >= 4096 else blocks
    if B > _MAX_GRID_YZ:   # grid axis 1 holds at most 65535 rows: launch in slices of the batch
        for b0 in range(0, B, _MAX_GRID_YZ):
            sl = slice(b0, b0 + _MAX_GRID_YZ)
            mrope_rotate_triton(q[sl], k[sl], q_out[sl], k_out[sl], position_ids[:, sl], inv_freq, mrope_section,
                                scale, inverse, split=split)
        return
    grid = (S, B, min(split, _MAX_GRID_YZ))
    _mrope_kernel[grid](
        q, k, q_out, k_out, position_ids, inv_freq, Hq, Hkv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        position_ids.stride(0), position_ids.stride(1), position_ids.stride(2),
        float(scale),
        HALF=half, SEC_T=s_t, SEC_TH=s_t + s_h, INVERSE=bool(inverse),
        HALF_PAD=cfg["HALF_PAD"], BLOCK_HQ=cfg["BLOCK_HQ"], BLOCK_HK=cfg["BLOCK_HK"], num_warps=cfg["num_warps"],
    )


def aot_specs() -> list[KernelSpec]:
    """Compile configurations for the AOT report: Qwen2-VL shapes and the edges of the D range."""
    import torch

    cases = [  # (label, dtype, D, sections, Hq, Hkv, inverse, position dtype)
        ("qwen2vl-7b bf16 fwd", torch.bfloat16, 128, (16, 24, 24), 28, 4, False, torch.int64),
        ("qwen2vl-7b bf16 bwd", torch.bfloat16, 128, (16, 24, 24), 28, 4, True, torch.int64),
        ("qwen2vl-7b fp16 fwd", torch.float16, 128, (16, 24, 24), 28, 4, False, torch.int64),
        ("D=128 fp32 fwd", torch.float32, 128, (16, 24, 24), 28, 4, False, torch.int64),
        ("qwen2vl-2b bf16 fwd", torch.bfloat16, 128, (16, 24, 24), 12, 2, False, torch.int32),
        ("D=64 bf16 fwd", torch.bfloat16, 64, (8, 12, 12), 16, 4, False, torch.int64),
        ("D=80 bf16 fwd", torch.bfloat16, 80, (8, 16, 16), 16, 16, False, torch.int64),
        ("D=256 bf16 fwd", torch.bfloat16, 256, (32, 48, 48), 16, 2, False, torch.int64),
    ]
    specs = []
    for label, dtype, D, sec, hq, hkv, inverse, pos_dtype in cases:
        cfg = launch_config(D // 2, hq, hkv)
        signature = {"q_ptr": pointer(dtype), "k_ptr": pointer(dtype), "qo_ptr": pointer(dtype),
                     "ko_ptr": pointer(dtype), "pos_ptr": pointer(pos_dtype), "inv_freq_ptr": pointer(torch.float32),
                     "scale": "fp32"}
        for name in ("Hq", "Hkv", "sq_b", "sq_s", "sq_h", "sk_b", "sk_s", "sk_h", "sqo_b", "sqo_s", "sqo_h",
                     "sko_b", "sko_s", "sko_h", "sp_a", "sp_b", "sp_s"):
            signature[name] = "i32"
        constexprs = {"HALF": D // 2, "HALF_PAD": cfg["HALF_PAD"], "SEC_T": sec[0], "SEC_TH": sec[0] + sec[1],
                      "BLOCK_HQ": cfg["BLOCK_HQ"], "BLOCK_HK": cfg["BLOCK_HK"], "INVERSE": inverse}
        specs.append(KernelSpec(_mrope_kernel, signature, constexprs, num_warps=cfg["num_warps"], num_stages=1,
                                label=f"{label} (D={D}, BLOCK_HQ={cfg['BLOCK_HQ']}, BLOCK_HK={cfg['BLOCK_HK']})"))
    return specs
