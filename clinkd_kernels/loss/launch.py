"""Launching the distillation row kernel: block sizes, the top-k bitmap, the launcher ``kd_rows_triton``
(the row contract of ``rows.py``) and the ahead-of-time compile specs.
"""

from __future__ import annotations

import torch
import triton

from ..aot import KernelSpec, kernel_signature
from .kernels import DENSE, NO_TEACHER, SPARSE, kd_rows_kernel

# Largest vocabulary tile. Tests lower it to cover many tiles with small vocabularies.
MAX_BLOCK_V = 2048  # 8 elements per thread per array at 8 warps: no spills in any config (AOT test)


def topk_bitmap(indices: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 [n, ceil(V/32)] with bit (v mod 32) of word v // 32 set for each top-k index v of the row.

    Indices of a row are distinct (checked), so adding the bits equals OR-ing them; bit 31 is added
    as −2^31, which keeps every partial sum inside int32.
    """
    idx = indices.long()
    bit = torch.bitwise_left_shift(torch.ones_like(idx), idx & 31)
    bit = torch.where(bit >= 2**31, bit - 2**32, bit).to(torch.int32)
    words = torch.zeros(idx.shape[0], (vocab + 31) // 32, dtype=torch.int32, device=idx.device)
    return words.scatter_add_(1, idx >> 5, bit)


def _block_v(vocab: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(vocab))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def kd_rows_triton(
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
    """Launch the kernel over the rows of z [n, V] (last dim contiguous).

    teacher_logits [n, >= V] or topk = (indices [n, k], logprobs [n, k], residual [n]) or neither.
    coef_kd, coef_ce fp32 [n]; writes kd_out, ce_out fp32 [n] and, when given, grad_out [n, V]
    (which may be z itself).
    """
    n, vocab = z.shape
    if n == 0:
        return
    labels = labels.contiguous()  # read as labels_ptr + row (likewise the [n] outputs and coefficients)
    block_v = _block_v(vocab)
    dummy = z
    t, stride_t = dummy, 0
    idx = lp = res = bits = dummy
    stride_k = stride_bits = k = 0
    block_k = 1
    mode = NO_TEACHER
    if teacher_logits is not None:
        mode, t, stride_t = DENSE, teacher_logits, teacher_logits.stride(0)
    elif topk is not None:
        mode = SPARSE
        idx, lp, res = topk
        idx, lp, res = idx.contiguous(), lp.contiguous(), res.contiguous()
        k = idx.shape[1]
        stride_k = k
        block_k = triton.next_power_of_2(k)
        bits = topk_bitmap(idx, vocab)
        stride_bits = bits.stride(0)
    g, stride_g = (grad_out, grad_out.stride(0)) if grad_out is not None else (dummy, 0)
    kd_rows_kernel[(n,)](
        z,
        z.stride(0),
        t,
        stride_t,
        idx,
        lp,
        stride_k,
        res,
        k,
        bits,
        stride_bits,
        labels,
        coef_kd,
        coef_ce,
        kd_out,
        ce_out,
        g,
        stride_g,
        vocab,
        float(inv_t),
        int(ignore_index),
        TEACHER=mode,
        WRITE_GRAD=grad_out is not None,
        T_IS_ONE=inv_t == 1.0,
        BLOCK_V=block_v,
        BLOCK_K=block_k,
        num_warps=_num_warps(block_v),
    )


def aot_specs() -> list[KernelSpec]:
    """The configurations a training step launches: bf16/fp32 logits, dense/sparse/no teacher, with gradient."""
    specs = []

    def spec(dtype, mode, block_k=1, t_is_one=False, write_grad=True):
        sparse = mode == SPARSE
        sig = kernel_signature(
            kd_rows_kernel,
            {
                "z_ptr": dtype,
                "t_ptr": dtype,
                "g_ptr": dtype,
                # without a sparse teacher the launcher passes z for the unused top-k pointers
                "idx_ptr": torch.int32 if sparse else dtype,
                "lp_ptr": torch.float32 if sparse else dtype,
                "res_ptr": torch.float32 if sparse else dtype,
                "bits_ptr": torch.int32 if sparse else dtype,
                "labels_ptr": torch.int64,
                "ckd_ptr": torch.float32,
                "cce_ptr": torch.float32,
                "kd_ptr": torch.float32,
                "ce_ptr": torch.float32,
            },
            floats=("inv_t",),
        )
        name = {NO_TEACHER: "ce-only", DENSE: "dense", SPARSE: f"topk{block_k}"}[mode]
        block_v = MAX_BLOCK_V
        return KernelSpec(
            kd_rows_kernel,
            sig,
            dict(TEACHER=mode, WRITE_GRAD=write_grad, T_IS_ONE=t_is_one, BLOCK_V=block_v, BLOCK_K=block_k),
            num_warps=_num_warps(block_v),
            num_stages=3,
            label=f"{str(dtype).replace('torch.', '')} {name} T{'=1' if t_is_one else '!=1'} "
            f"{'fwd+grad' if write_grad else 'fwd only'} BLOCK_V={block_v} "
            f"warps={_num_warps(block_v)}",
        )

    specs.append(spec(torch.bfloat16, DENSE))
    specs.append(spec(torch.float32, DENSE))
    specs.append(spec(torch.bfloat16, SPARSE, block_k=256))
    specs.append(spec(torch.bfloat16, DENSE, t_is_one=True))
    specs.append(spec(torch.bfloat16, SPARSE, block_k=1024))
    specs.append(spec(torch.bfloat16, NO_TEACHER))
    specs.append(spec(torch.bfloat16, DENSE, write_grad=False))
    specs.append(spec(torch.bfloat16, SPARSE, block_k=256, write_grad=False))
    return specs
