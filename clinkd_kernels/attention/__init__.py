"""``mcg_rope_attention``: M-RoPE fused into FlashAttention-2-style forward and backward Triton kernels,
causal or not, GQA, padded (attention_mask) and packed (cu_seqlens) batches.

Reading order: ``reference.py`` (rotation, then softmax(QKᵀ·scale + masks)·V in plain PyTorch: the
spec), ``op.py`` (the public function, the custom ops and autograd), ``checks.py`` (the argument
checks), the Triton kernels in two files, ``fwd.py`` (the forward kernel: online softmax with q and k
rotated in registers by the helpers of ``clinkd_kernels/rope/kernels.py``) and ``bwd.py`` (the
backward kernels: a preprocess, dK/dV, dQ, a finishing rotation), ``launch.py`` (block configs per
architecture, autotuning, launches, the ahead-of-time compile specs), ``cpu.py`` (the CPU path:
``apply_mrope``, then SDPA).
"""

from .checks import HEAD_DIMS
from .op import mcg_rope_attention
from .reference import mcg_rope_attention_reference

__all__ = ["HEAD_DIMS", "mcg_rope_attention", "mcg_rope_attention_reference"]
