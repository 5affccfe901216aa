"""clinkd_kernels: fused Triton / CUDA / C++ ops for ClinKD training of multimodal LLMs.

One folder per op; a file name has one role in every folder, read in this order: ``reference.py``
(the math in plain PyTorch, the spec the kernels are tested against), ``op.py`` (the public function:
dispatch, custom op, autograd), ``checks.py`` (its argument checks), ``kernels.py`` (the Triton
kernels; attention's are ``fwd.py`` / ``bwd.py``), ``launch.py`` (block sizes, launches, ahead-of-time
compile specs), ``cpu.py`` (the CPU path). A folder has only the files of the roles it has (topk's
kernels are C++ in ``csrc/``, rope_index has none); its ``__init__`` says what is where, including
its own extra files (rope's ``layout.py``, rope_index's ``device.py``, loss's ``rows.py``,
``portable.py`` and ``linear_op.py``).

* :func:`topk_pseudo_labels` (``topk/``) – teacher logits → top-k pseudo-labels in one read
  (C++ and CUDA C++ kernels in ``csrc/topk``).
* :func:`mcg_rope_index`, :func:`mrope_decode_position_ids` (``rope_index/``) – MCG-RoPE 3-D positions.
* :func:`apply_mrope` (``rope/``) – the M-RoPE rotation; its ``kernels.py`` holds the rotary helpers
  every Triton kernel of the package uses.
* :func:`mcg_rope_attention` (``attention/``) – M-RoPE fused into FlashAttention-style forward/backward.
* :func:`kd_loss`, :func:`linear_kd_loss` (``loss/``) – temperature KL + cross-entropy, dense or top-k
  teacher, optionally fused with the lm_head.

Memory: ``_memory.py`` makes the kernels' output buffers; :func:`empty_cpu_cache` unmaps the CPU buffers
it keeps for reuse (the lm_head weight gradient's, on 2 MiB pages), as ``torch.cuda.empty_cache`` does
on CUDA.

Shared: ``_dispatch.py`` (``OP_BACKENDS``, the one table of the backends each op serves, and which
backend runs a call), ``_validation.py`` (argument checks),
``aot.py`` (ahead-of-time compilation for sm_80/sm_90 without a GPU; ``python -m clinkd_kernels.report``),
``info.py`` (``python -m clinkd_kernels.info``: versions, backends, a self-check of every op).
Importing this package imports torch, triton and numpy only.
"""

import torch  # noqa: F401  (loads libtorch before the compiled extension)

from clinkd_kernels._memory import cpu_cache_bytes, empty_cpu_cache
from clinkd_kernels._validation import TEMPERATURE_RANGE
from clinkd_kernels.attention import mcg_rope_attention
from clinkd_kernels.loss import kd_loss, linear_kd_loss
from clinkd_kernels.rope import apply_mrope
from clinkd_kernels.rope_index import mcg_rope_index, mrope_decode_position_ids
from clinkd_kernels.topk import PseudoLabels, topk_pseudo_labels

__version__ = "0.1.0"

__all__ = [
    "PseudoLabels",
    "TEMPERATURE_RANGE",
    "apply_mrope",
    "cpu_cache_bytes",
    "empty_cpu_cache",
    "kd_loss",
    "linear_kd_loss",
    "mcg_rope_attention",
    "mcg_rope_index",
    "mrope_decode_position_ids",
    "topk_pseudo_labels",
]
