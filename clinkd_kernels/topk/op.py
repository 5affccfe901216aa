"""``topk_pseudo_labels``: the public function and the registration of the compiled kernels' fake kernel
(the argument checks are ``checks.py``'s).

Kernels: ``csrc/topk/topk_cpu.cpp`` (CPU, rows in parallel) and ``csrc/topk/topk_cuda.cu`` (CUDA,
one thread block per row), both one read of the logits; they are registered with the torch
dispatcher as ``torch.ops.clinkd.topk_pseudo_labels_ext``. The math and the handling of infinities
are written once, in :mod:`clinkd_kernels.topk.reference`.
"""

from __future__ import annotations

import torch

from .._dispatch import extension, resolve_backend
from .checks import check_inputs, check_lse
from .reference import PseudoLabels, topk_pseudo_labels_reference

if extension() is not None:

    @torch.library.register_fake("clinkd::topk_pseudo_labels_ext")
    def _fake(logits, k, temperature):
        n = logits.shape[0]
        f32 = dict(dtype=torch.float32, device=logits.device)
        return (
            logits.new_empty((n, k), dtype=torch.int32),
            torch.empty((n, k), **f32),
            torch.empty((n,), **f32),
            torch.empty((n,), **f32),
            torch.empty((n,), **f32),
        )


def topk_pseudo_labels(
    logits: torch.Tensor, k: int, *, temperature: float = 1.0, backend: str | None = None, check: bool = True
) -> PseudoLabels:
    """Teacher logits [N, V] → the top-k pseudo-labels of every row, in one read of the logits.

    Args:
        logits: [N, V] float32/float16/bfloat16 teacher logits. Rows may be strided (e.g. a slice of
            [B, S, V] viewed as [B·S, V]) as long as the vocabulary dimension has unit stride;
            otherwise the tensor is copied once to make it so.
        k: number of pseudo-labels per row, 1 ≤ k ≤ min(V, 1024).
        temperature: T in [1e-6, 1e6]; the distribution is softmax(logits / T). Extract at the temperature the
            distillation will train at: the loss does not re-temper the stored log-probabilities.
        backend: ``"cuda"`` / ``"cpu"`` (the C++ kernels) or ``"torch"`` (the reference); default by device.
        check: raise ValueError on rows that hold NaN or are entirely −inf (costs one host sync on
            CUDA; pass False inside captured graphs and check ``lse`` yourself).

    Returns:
        PseudoLabels(indices int32 [N,k], logprobs fp32 [N,k], lse fp32 [N], margin fp32 [N],
        residual fp32 [N]); indices by descending probability, ties by lower id.
    """
    temperature = check_inputs(logits, k, temperature)
    n = logits.shape[0]
    if n > 0 and logits.stride(1) != 1:
        logits = logits.contiguous()

    chosen = resolve_backend("topk_pseudo_labels", backend, logits.device)
    if chosen == "torch":
        result = topk_pseudo_labels_reference(logits, k, temperature=temperature, compute_dtype=torch.float32)
    else:
        result = PseudoLabels(*torch.ops.clinkd.topk_pseudo_labels_ext(logits, k, temperature))

    if check and n > 0:
        check_lse(result.lse)
    return result
