"""``topk_pseudo_labels``: teacher logits → top-k pseudo-labels (indices, log-probs, log-sum-exp,
confidence margin, residual mass) in one read of the logits.

Reading order: ``reference.py`` (the math, the handling of infinities and the ``PseudoLabels`` type:
the spec), ``op.py`` (the public function, the fake kernel for torch.compile), ``checks.py`` (the
argument checks), then the kernels, which are C++ and CUDA C++ compiled into ``clinkd_kernels._C``:
``csrc/topk/topk_cpu.cpp`` (rows in parallel, a bounded heap per row, AVX2 where the CPU has it) and
``csrc/topk/topk_cuda.cu`` (one thread block per row), sharing ``csrc/topk/topk_common.cpp`` (the
argument checks in C++). No Triton kernel, so no ``kernels.py`` / ``launch.py``.
"""

from .checks import MAX_K
from .op import topk_pseudo_labels
from .reference import PseudoLabels, topk_pseudo_labels_reference

__all__ = ["MAX_K", "PseudoLabels", "topk_pseudo_labels", "topk_pseudo_labels_reference"]
