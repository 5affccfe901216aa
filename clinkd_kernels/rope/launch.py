"""Launch configuration of the M-RoPE rotation kernel, its launcher and its AOT compile specs.

Tensors arrive validated (``op.py``): q [B,S,Hq,D], k [B,S,Hkv,D] with unit stride in the last dim,
any strides over batch, sequence and heads; position_ids [3,B,S] int32/int64; inv_freq fp32 [D/2].
"""

from __future__ import annotations

import triton

from ..aot import KernelSpec, kernel_signature
from .kernels import mrope_rotate_kernel

_MAX_GRID_YZ = 65535


def launch_config(half: int, hq: int, hkv: int) -> dict:
    """Block sizes: about 1024 elements per half-tile (8 fp32 values per thread at 4 warps)."""
    half_pad = triton.next_power_of_2(half)
    cap = max(1, 1024 // half_pad)
    return dict(
        HALF_PAD=half_pad,
        BLOCK_HQ=min(cap, triton.next_power_of_2(max(hq, 1))),
        BLOCK_HK=min(cap, triton.next_power_of_2(max(hkv, 1))),
        num_warps=4,
    )


def mrope_rotate_triton(
    q, k, q_out, k_out, position_ids, inv_freq, axis, scale: float, inverse: bool, *, split: int | None = None
) -> None:
    """Write the rotation of q [B,S,Hq,D], k [B,S,Hkv,D] (last dim contiguous) into q_out, k_out.

    position_ids [3,B,S] (any strides, int32/int64); inv_freq [D/2] fp32 contiguous; axis int32 [D/2], the
    rotary layout (``layout.py``). q and q_out may
    be None: then only k is rotated (the fused attention's pre-rotated keys).
    ``split`` (heads per token spread over that many programs) defaults to 1 when B·S alone gives
    enough programs, else enough to give each program one block of q heads.
    """
    B, S, Hkv, D = k.shape
    if q is None:  # no q heads: the kernel's q loop runs zero times, its pointers are never read
        q, q_out = k[:, :, :0], k_out[:, :, :0]
    Hq = q.shape[2]
    half = D // 2
    cfg = launch_config(half, Hq, Hkv)
    if split is None:
        blocks = max(triton.cdiv(Hq, cfg["BLOCK_HQ"]), triton.cdiv(Hkv, cfg["BLOCK_HK"]))
        split = 1 if B * S >= 4096 else blocks
    if B > _MAX_GRID_YZ:  # grid axis 1 holds at most 65535 rows: launch in slices of the batch
        for b0 in range(0, B, _MAX_GRID_YZ):
            sl = slice(b0, b0 + _MAX_GRID_YZ)
            mrope_rotate_triton(
                q[sl], k[sl], q_out[sl], k_out[sl], position_ids[:, sl], inv_freq, axis, scale, inverse, split=split
            )
        return
    grid = (S, B, min(split, _MAX_GRID_YZ))
    mrope_rotate_kernel[grid](
        q,
        k,
        q_out,
        k_out,
        position_ids,
        inv_freq,
        axis,
        Hq,
        Hkv,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        q_out.stride(0),
        q_out.stride(1),
        q_out.stride(2),
        k_out.stride(0),
        k_out.stride(1),
        k_out.stride(2),
        position_ids.stride(0),
        position_ids.stride(1),
        position_ids.stride(2),
        float(scale),
        HALF=half,
        INVERSE=bool(inverse),
        HALF_PAD=cfg["HALF_PAD"],
        BLOCK_HQ=cfg["BLOCK_HQ"],
        BLOCK_HK=cfg["BLOCK_HK"],
        num_warps=cfg["num_warps"],
    )


def aot_specs() -> list[KernelSpec]:
    """Compile configurations for the AOT report: Qwen2-VL / Qwen2.5-VL and Qwen3-VL shapes and the
    edges of the D range. The rotary layout (contiguous or interleaved sections) is data, read from the
    axis vector: one compiled kernel per shape serves every layout."""
    import torch

    cases = [  # (label, dtype, D, Hq, Hkv, inverse, position dtype)
        ("qwen2vl-7b bf16 fwd", torch.bfloat16, 128, 28, 4, False, torch.int64),
        ("qwen2vl-7b bf16 bwd", torch.bfloat16, 128, 28, 4, True, torch.int64),
        ("qwen2vl-7b fp16 fwd", torch.float16, 128, 28, 4, False, torch.int64),
        ("D=128 fp32 fwd", torch.float32, 128, 28, 4, False, torch.int64),
        ("qwen2vl-2b bf16 fwd", torch.bfloat16, 128, 12, 2, False, torch.int32),
        ("qwen3vl-8b bf16 fwd", torch.bfloat16, 128, 32, 8, False, torch.int64),
        ("qwen3vl-8b bf16 bwd", torch.bfloat16, 128, 32, 8, True, torch.int64),
        ("qwen3vl-2b bf16 fwd", torch.bfloat16, 128, 16, 8, False, torch.int64),
        ("D=64 bf16 fwd", torch.bfloat16, 64, 16, 4, False, torch.int64),
        ("D=80 bf16 fwd", torch.bfloat16, 80, 16, 16, False, torch.int64),
        ("D=256 bf16 fwd", torch.bfloat16, 256, 16, 2, False, torch.int64),
    ]
    specs = []
    for label, dtype, D, hq, hkv, inverse, pos_dtype in cases:
        cfg = launch_config(D // 2, hq, hkv)
        signature = kernel_signature(
            mrope_rotate_kernel,
            {
                "q_ptr": dtype,
                "k_ptr": dtype,
                "qo_ptr": dtype,
                "ko_ptr": dtype,
                "pos_ptr": pos_dtype,
                "inv_freq_ptr": torch.float32,
                "axis_ptr": torch.int32,
            },
            floats=("scale",),
        )
        constexprs = {
            "HALF": D // 2,
            "HALF_PAD": cfg["HALF_PAD"],
            "BLOCK_HQ": cfg["BLOCK_HQ"],
            "BLOCK_HK": cfg["BLOCK_HK"],
            "INVERSE": inverse,
        }
        specs.append(
            KernelSpec(
                mrope_rotate_kernel,
                signature,
                constexprs,
                num_warps=cfg["num_warps"],
                num_stages=1,
                label=f"{label} (D={D}, BLOCK_HQ={cfg['BLOCK_HQ']}, BLOCK_HK={cfg['BLOCK_HK']})",
            )
        )
    return specs
