"""Block configs, autotuning and launches of the attention kernels, plus their AOT compile specs.

Tensors reach these functions already validated and flattened (see ``op.py``):
    q [T_total, HQ, D], k/v [T_total, HKV, D] contiguous, pos int64 [3, T_total] contiguous,
    inv_freq fp32 [D/2], mask int8 [T_total] or None, cu_seqlens int32 [B+1] or None.
On CUDA the block sizes come from a short ``triton.autotune`` list per architecture (sm_80 / sm_90);
under ``TRITON_INTERPRET=1`` a fixed small config is used (tests may change ``INTERPRETER_BLOCKS``).
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from .._dispatch import triton_interpret
from .._memory import empty_output
from ..aot import KernelSpec, kernel_arguments, kernel_signature
from ..rope.launch import mrope_rotate_triton
from .bwd import mcg_attn_bwd_dkdv_kernel, mcg_attn_bwd_dq_kernel, mcg_attn_bwd_finish_kernel, mcg_attn_bwd_prep_kernel
from .fwd import mcg_attn_fwd_kernel

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per architecture, each compiled ahead of time without
# spills (see aot_specs / tests). Register pressure decides them: D=128 needs fp32 accumulators of
# 128-256 columns next to the matmul operands, so sm_80 (operands in registers) gets smaller tiles
# than sm_90 (wgmma reads B, and A when loaded, from shared memory; 8 warps = 2 warpgroups).
CONFIGS = {
    80: {
        "fwd": [(64, 64, 4, 2), (64, 32, 4, 3)],
        "dkdv": [(16, 128, 8, 2), (32, 32, 4, 2)],
        "dq": [(64, 32, 4, 2), (128, 32, 8, 2)],
    },
    90: {
        "fwd": [(128, 64, 8, 2), (128, 64, 8, 3)],
        "dkdv": [(64, 64, 8, 2), (32, 128, 8, 2)],
        "dq": [(128, 64, 8, 2), (64, 64, 4, 2)],
    },
}
# Configs a head dim cannot take without spilling (ptxas of triton 3.8): the autotuner never tries them
# for that head dim. sm_90 dK/dV at 64x64, 8 warps, 2 stages sits at the 255-register ceiling for every
# D; D = 72 (its masked 36-column half tiles) tips it over into spills.
SPILLING = {(90, "dkdv", 72): {(64, 64, 8, 2)}}


def configs_for(kind: str, arch: int, head_dim: int) -> list[tuple[int, int, int, int]]:
    """The autotune configs of ``kind`` on ``arch`` that ``head_dim`` compiles without spills."""
    return [c for c in CONFIGS[arch][kind] if c not in SPILLING.get((arch, kind, head_dim), ())]


# Fixed blocks in the interpreter. BLOCK_M ≠ BLOCK_N on purpose, so the tests cross the block edges of
# the outer and inner loops differently; tests may swap them.
INTERPRETER_BLOCKS = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}
PREP_BLOCK = 16  # rows per program of the element-wise passes: [16, 64] tiles keep their registers few
# Forward K rotation: in registers as each K tile is loaded (default), or once up front by apply_mrope's
# kernel into a transient [T_total, HKV, D] copy ("prepass"), which removes the per-tile sin/cos from
# the loop. CLINKD_ATTN_K_ROTATION=prepass selects the latter (compared side by side in the benchmarks).
K_ROTATION_MODES = ("in_kernel", "prepass")


def k_rotation_mode() -> str:
    """How the forward rotates K: ``CLINKD_ATTN_K_ROTATION`` (one of K_ROTATION_MODES), "in_kernel" by default."""
    mode = os.environ.get("CLINKD_ATTN_K_ROTATION", "in_kernel")
    if mode not in K_ROTATION_MODES:
        raise ValueError(f"CLINKD_ATTN_K_ROTATION must be one of {K_ROTATION_MODES}, got {mode!r}")
    return mode


_KERNELS = {"fwd": mcg_attn_fwd_kernel, "dkdv": mcg_attn_bwd_dkdv_kernel, "dq": mcg_attn_bwd_dq_kernel}
_AUTOTUNE_KEY = ["HEAD_DIM", "CAUSAL", "HAS_MASK", "VARLEN", "IEEE", "seq_bucket", "GROUP"]
_EXTRA_KEY = {"fwd": ["K_ROTATED"], "dkdv": [], "dq": []}


def _arch(device: torch.device) -> int:
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


@functools.cache
def _tuned(kind: str, arch: int):
    """Kernel ``kind`` autotuned over CONFIGS[arch][kind], less the configs the head dim would spill in."""
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in CONFIGS[arch][kind]
    ]

    def prune(configs, named_args, **kwargs):
        allowed = set(configs_for(kind, arch, kwargs["HEAD_DIM"]))
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]

    return triton.autotune(
        configs=configs, key=_AUTOTUNE_KEY + _EXTRA_KEY[kind], prune_configs_by={"early_config_prune": prune}
    )(_KERNELS[kind])


def _launch(kind: str, grid_rows: int, n_programs_1: int, batch: int, args: tuple, meta: dict) -> None:
    """Launch kernel ``kind`` over (row blocks, heads, batch), autotuned on CUDA, fixed in the interpreter."""
    if triton_interpret() and args[0].device.type == "cpu":
        bm, bn = INTERPRETER_BLOCKS[kind]
        rows = bm if kind != "dkdv" else bn
        _KERNELS[kind][(triton.cdiv(grid_rows, rows), n_programs_1, batch)](
            *args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1
        )
        return
    fn = _tuned(kind, _arch(args[0].device))
    row_key = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    fn[lambda cfg: (triton.cdiv(grid_rows, cfg[row_key]), n_programs_1, batch)](*args, **meta)


def _meta(q, causal, mask, cu_seqlens):
    """The constexprs every attention kernel takes, for flat q [T_total, HQ, D]."""
    d = q.shape[-1]
    return {
        "HEAD_DIM": d,
        "HALF_PAD": triton.next_power_of_2(d // 2),
        "D_PAD": triton.next_power_of_2(d),
        "CAUSAL": bool(causal),
        "HAS_MASK": mask is not None,
        "VARLEN": cu_seqlens is not None,
        "IEEE": q.dtype == torch.float32,
    }


def _common(q, k, seqlen, max_seqlen):
    """The kernels' int arguments: seqlen, n_tokens, HQ, GROUP, seq_bucket."""
    group = q.shape[1] // k.shape[1]
    return (seqlen, q.shape[0], q.shape[1], group, triton.next_power_of_2(max(max_seqlen, 1)))


def attention_forward(
    q,
    k,
    v,
    pos,
    inv_freq,
    axis,
    mask,
    cu_seqlens,
    *,
    causal: bool,
    scale: float,
    batch: int,
    seqlen: int,
    max_seqlen: int,
):
    """out [T_total, HQ, D] (q's dtype), lse fp32 [HQ, T_total] (base-2, +inf on padded rows);
    axis: int32 [D/2], the rotary layout (``clinkd_kernels.rope.layout``)."""
    out = empty_output(q.shape, dtype=q.dtype, device=q.device)
    lse = empty_output((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    if q.shape[0] == 0 or max_seqlen == 0:
        return out, lse
    ints = _common(q, k, seqlen, max_seqlen)
    prepass = k_rotation_mode() == "prepass"
    if prepass:
        k_in = torch.empty_like(k)
        mrope_rotate_triton(None, k[None], None, k_in[None], pos[:, None], inv_freq, axis, 1.0, False)
    else:
        k_in = k
    args = (q, k_in, v, pos, inv_freq, axis, mask, cu_seqlens, out, lse, scale) + ints
    _launch("fwd", max_seqlen, q.shape[1], batch, args, {**_meta(q, causal, mask, cu_seqlens), "K_ROTATED": prepass})
    return out, lse


def attention_backward(
    do,
    q,
    k,
    v,
    out,
    lse,
    pos,
    inv_freq,
    axis,
    mask,
    cu_seqlens,
    *,
    causal: bool,
    scale: float,
    batch: int,
    seqlen: int,
    max_seqlen: int,
):
    """(dq, dk, dv) shaped like (q, k, v), for the pre-rotary q and k."""
    n_tokens, hq, d = q.shape
    hkv = k.shape[1]
    if n_tokens == 0 or max_seqlen == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = empty_output((hq, n_tokens), dtype=torch.float32, device=q.device)
    q_rot = empty_output(q.shape, dtype=q.dtype, device=q.device)
    k_rot = empty_output(k.shape, dtype=k.dtype, device=k.device)
    mcg_attn_bwd_prep_kernel[(triton.cdiv(n_tokens, PREP_BLOCK), hq + hkv)](
        q,
        k,
        out,
        do,
        pos,
        inv_freq,
        axis,
        q_rot,
        k_rot,
        delta,
        n_tokens,
        hq,
        hkv,
        HEAD_DIM=d,
        HALF_PAD=triton.next_power_of_2(d // 2),
        D_PAD=triton.next_power_of_2(d),
        BLOCK=PREP_BLOCK,
    )
    dq_rot = empty_output(q.shape, dtype=torch.float32, device=q.device)
    dk_rot = empty_output(k.shape, dtype=torch.float32, device=k.device)
    dv = empty_output(v.shape, dtype=v.dtype, device=v.device)
    ints = _common(q, k, seqlen, max_seqlen)  # the matmul kernels see rotated q, k: no rotary layout
    meta = _meta(q, causal, mask, cu_seqlens)
    head = (q_rot, k_rot, v, mask, cu_seqlens, do, lse, delta)
    _launch("dkdv", max_seqlen, hkv, batch, head + (dk_rot, dv, scale) + ints, meta)
    _launch("dq", max_seqlen, hq, batch, head + (dq_rot, scale) + ints, meta)
    del q_rot, k_rot
    dq = empty_output(q.shape, dtype=q.dtype, device=q.device)
    dk = empty_output(k.shape, dtype=k.dtype, device=k.device)
    mcg_attn_bwd_finish_kernel[(triton.cdiv(n_tokens, PREP_BLOCK), hq + hkv)](
        dq_rot,
        dk_rot,
        pos,
        inv_freq,
        axis,
        dq,
        dk,
        n_tokens,
        hq,
        hkv,
        HEAD_DIM=d,
        HALF_PAD=triton.next_power_of_2(d // 2),
        BLOCK=PREP_BLOCK,
    )
    return dq, dk, dv


def _attn_signature(kind: str, dtype) -> dict:
    """The runtime arguments of an attention kernel, typed for ``dtype`` q/k/v (read from the kernel)."""
    f32 = torch.float32
    types = {
        "Q": dtype,
        "K": dtype,
        "QR": dtype,
        "KR": dtype,
        "V": dtype,
        "O": dtype,
        "DO": dtype,
        "DV": dtype,
        "DQ": dtype,
        "DK": dtype,
        "POS": torch.int64,
        "FREQ": f32,
        "AXIS": torch.int32,
        "MASK": torch.int8,
        "CU": torch.int32,
        "LSE": f32,
        "DELTA": f32,
        "DKR": f32,
        "DQR": f32,
    }
    fn = {**_KERNELS, "prep": mcg_attn_bwd_prep_kernel, "finish": mcg_attn_bwd_finish_kernel}[kind]
    names = {name for name, is_constexpr in kernel_arguments(fn) if not is_constexpr}
    return kernel_signature(
        fn, {k: v for k, v in types.items() if k in names}, floats=tuple(n for n in ("sm_scale",) if n in names)
    )


def aot_specs() -> list[KernelSpec]:
    """Compile specs: every autotune config of each arch (``spec.archs``) for bf16, D=128, causal, packed;
    the first config of each arch again for fp16, D=80 (half tile padded 40 → 64) with a padding mask,
    non-causal; for bf16, D=80 and D=72, non-causal, packed (the vision towers of Qwen2-VL / Qwen2.5-VL and
    of Qwen3-VL); and
    (forward) with K pre-rotated; the element-wise passes (backward prep and finish) for both archs."""
    specs = []
    for kind, fn in _KERNELS.items():
        for arch in (80, 90):
            for i, (bm, bn, w, s) in enumerate(CONFIGS[arch][kind]):
                variants = [(128, torch.bfloat16, True, False, True, False)]
                if i == 0:
                    variants.append((80, torch.float16, False, True, False, False))
                    variants.append((80, torch.bfloat16, False, False, True, False))  # vision towers:
                    if kind == "fwd":
                        variants.append((128, torch.bfloat16, True, False, True, True))
                if (bm, bn, w, s) == configs_for(kind, arch, 72)[0]:  # Qwen3-VL's: its first allowed config
                    variants.append((72, torch.bfloat16, False, False, True, False))
                for d, dtype, causal, has_mask, varlen, k_rotated in variants:
                    consts = {
                        "HEAD_DIM": d,
                        "HALF_PAD": triton.next_power_of_2(d // 2),
                        "D_PAD": triton.next_power_of_2(d),
                        "BLOCK_M": bm,
                        "BLOCK_N": bn,
                        "CAUSAL": causal,
                        "HAS_MASK": has_mask,
                        "VARLEN": varlen,
                        "IEEE": False,
                    }
                    if kind == "fwd":
                        consts["K_ROTATED"] = k_rotated
                    form = " ".join(
                        w
                        for w, on in (
                            ("causal" if causal else "full", True),
                            ("masked", has_mask),
                            ("varlen", varlen),
                            ("k-prerotated", k_rotated),
                        )
                        if on
                    )
                    specs.append(
                        KernelSpec(
                            fn,
                            _attn_signature(kind, dtype),
                            consts,
                            num_warps=w,
                            num_stages=s,
                            archs=(arch,),
                            label=f"sm{arch} {kind} D={d} {str(dtype)[6:]} {form} BM={bm} BN={bn} w={w} s={s}",
                        )
                    )
    for d, dtype in ((128, torch.bfloat16), (80, torch.float16), (72, torch.bfloat16)):
        half, dpad = triton.next_power_of_2(d // 2), triton.next_power_of_2(d)
        for kind, fn, consts in (
            ("prep", mcg_attn_bwd_prep_kernel, {"D_PAD": dpad}),
            ("finish", mcg_attn_bwd_finish_kernel, {}),
        ):
            specs.append(
                KernelSpec(
                    fn,
                    _attn_signature(kind, dtype),
                    {"HEAD_DIM": d, "HALF_PAD": half, "BLOCK": PREP_BLOCK, **consts},
                    num_warps=4,
                    num_stages=1,
                    label=f"{kind} D={d} {str(dtype)[6:]} BLOCK={PREP_BLOCK} w=4",
                )
            )
    return specs
