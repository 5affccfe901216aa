"""clinkd_kernels: fused Triton / CUDA / C++ ops for ClinKD training of multimodal LLMs.

Public ops (DESIGN.md §3); each lives in its own sub-package with its kernels and its reference:

* :func:`topk_pseudo_labels` – teacher logits → top-k pseudo-labels in one read (``topk/``).
"""

import torch  # noqa: F401  (loads libtorch before the compiled extension)

from clinkd_kernels.topk import PseudoLabels, topk_pseudo_labels

__version__ = "0.1.0"

__all__ = ["PseudoLabels", "topk_pseudo_labels"]
