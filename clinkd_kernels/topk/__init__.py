"""``topk_pseudo_labels``: teacher logits → top-k pseudo-labels (indices, log-probs, log-sum-exp,
confidence margin, residual mass) in one read of the logits.

Reading order: ``reference.py`` (the math, the handling of infinities and the ``PseudoLabels`` type:
the spec), ``op.py`` (the public function, its checks, the fake kernel for torch.compile), then the
kernels, which are C++ and CUDA C++ compiled into ``clinkd_kernels._C``: ``csrc/topk/topk_cpu.cpp``
(rows in parallel, a bounded heap per row, AVX2 where the CPU has it) and ``csrc/topk/topk_cuda.cu``
(one thread block per row), sharing ``csrc/topk/topk_common.cpp`` (the argument checks in C++).
"""

from .op import MAX_K, topk_pseudo_labels
from .reference import PseudoLabels, topk_pseudo_labels_reference

__all__ = ["MAX_K", "PseudoLabels", "topk_pseudo_labels", "topk_pseudo_labels_reference"]
