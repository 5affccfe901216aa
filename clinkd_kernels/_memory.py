"""Output buffers of the kernels: ``empty_output``, and large CPU buffers on 2 MiB pages with a cache that
keeps the lm_head weight gradient's for reuse.

A fresh buffer costs its first touch: the kernel maps and zeroes each page the first time it is written.
At Qwen's vocabulary the weight gradient of ``linear_kd_loss`` is a fresh [151936, 1536] fp32 buffer
(0.9 GiB) every step, and the matmul that first writes a buffer runs markedly slower than one writing a
buffer already touched. 2 MiB pages take a fault per 2 MiB instead of per 4 KiB, but the kernel still
zeroes each page on first touch, which evicts the matmul's cache-blocked panels: only a buffer that was
touched before avoids the cost. So:

* ``empty_huge_pages(shape, dtype=)``: an anonymous private mapping advised ``MADV_HUGEPAGE`` (Linux
  backs it with 2 MiB pages when ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or
  ``madvise``, the usual default; PyTorch's allocator asks for them only when the process started with
  ``THP_MEM_ALLOC_ENABLE=1``), unmapped when the tensor's storage dies. For the [chunk, V] logits buffers.
* ``cached=True``: the mapping is kept when the storage dies, still resident, for the next cached
  request of the same size (C++ cache of ``csrc/memory/cpu_buffers.cpp``; at most
  ``CLINKD_CPU_CACHE_MB`` MiB kept, default 4096, 0 turns it off). This is what PyTorch's CUDA caching
  allocator does for every CUDA tensor; here it is for ``linear_kd_loss``'s weight gradient alone, the buffer a
  training loop frees (``zero_grad()``) and needs again each step; within a step it costs nothing (the
  gradient lives through the backward anyway). The price: between steps its pages stay resident (0.9 GiB
  at Qwen's vocabulary) where the freed gradient would leave room for the next forward's activations.
  ``empty_cpu_cache()`` unmaps what is kept.

Elsewhere (not Linux, THP off, no compiled extension, a buffer under ``MIN_BYTES``) both are
``torch.empty``. The tensors are
ordinary contiguous CPU tensors, except that their storage cannot be resized.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import sys

import torch

from ._dispatch import extension

# Below this a mapping would hold too few 2 MiB pages to matter, and the allocator's reuse of freed
# blocks (no fault at all) is the better deal.
MIN_BYTES = 8 * 2**20
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.cache
def huge_pages_available() -> bool:
    """True on Linux with transparent huge pages not set to ``never``."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(_THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def empty_huge_pages(shape, *, dtype: torch.dtype, cached: bool = False) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor of ``shape``; on 2 MiB pages (and, if ``cached``, from and
    back to the cache) when that is available and it holds at least ``MIN_BYTES``."""
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    compiled = extension()
    if nbytes < MIN_BYTES or compiled is None or not huge_pages_available():
        return torch.empty(shape, dtype=dtype)
    return compiled.cpu_buffer_empty(list(shape), dtype, cached)


def cpu_cache_bytes() -> int:
    """Bytes held by cached buffers not in use."""
    compiled = extension()
    return 0 if compiled is None else int(compiled.cpu_buffer_cache_bytes())


def empty_cpu_cache() -> int:
    """Unmap the cached buffers not in use (as ``torch.cuda.empty_cache`` does on CUDA); returns the bytes
    released. Buffers in use stay, and return to the cache when their tensors die."""
    compiled = extension()
    return 0 if compiled is None else int(compiled.cpu_buffer_cache_clear())


def empty_output(
    shape, *, dtype: torch.dtype, device: torch.device, huge_pages: bool = False, cached: bool = False
) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; filled with NaN (or -1 for integers) when ``CLINKD_POISON=1``.

    ``huge_pages``: a large CPU buffer goes on 2 MiB pages where the OS offers them; ``cached`` also
    keeps its mapping for the next such request when it dies (``empty_huge_pages``).

    The test suite sets ``CLINKD_POISON=1`` so that an element a kernel forgot to write cannot pass
    by holding a plausible leftover value.
    """
    if (huge_pages or cached) and torch.device(device).type == "cpu":
        out = empty_huge_pages(shape, dtype=dtype, cached=cached)
    else:
        out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("CLINKD_POISON", "0") == "1":
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out
