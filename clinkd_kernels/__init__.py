"""clinkd_kernels: fused Triton / CUDA / C++ ops for ClinKD training of multimodal LLMs.

Public ops (DESIGN.md §3); each lives in its own sub-package with its kernels and its reference:

* :func:`topk_pseudo_labels` – teacher logits → top-k pseudo-labels in one read (``topk/``).
* :func:`mcg_rope_index`, :func:`apply_mrope`, :func:`mrope_decode_position_ids` – MCG-RoPE 3-D
  positions and the M-RoPE rotation (``rope/``).
* :func:`mcg_rope_attention` – M-RoPE fused into FlashAttention-style forward/backward (``attention/``).
* :func:`kd_loss`, :func:`linear_kd_loss` – temperature KL + cross-entropy, dense or top-k teacher,
  optionally fused with the lm_head (``loss/``).
"""

import torch  # noqa: F401  (loads libtorch before the compiled extension)

from clinkd_kernels.attention import mcg_rope_attention
from clinkd_kernels.loss import kd_loss, linear_kd_loss
from clinkd_kernels.rope import apply_mrope, mcg_rope_index, mrope_decode_position_ids
from clinkd_kernels.topk import PseudoLabels, topk_pseudo_labels

__version__ = "0.1.0"

__all__ = ["PseudoLabels", "apply_mrope", "kd_loss", "linear_kd_loss", "mcg_rope_attention", "mcg_rope_index", "mrope_decode_position_ids", "topk_pseudo_labels"]
