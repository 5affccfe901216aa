"""Peak memory of one call, measured the same way for every implementation in a benchmark.

* CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated before.
* CPU (Linux): the resident-set high-water mark VmHWM, reset through ``/proc/self/clear_refs`` right
  before the call, minus VmRSS before it. For that to be the call's own peak, every large tensor must
  get fresh pages: glibc's mmap threshold is pinned at 128 KiB on import (by default it rises to up to
  32 MiB after large frees, and a tensor then reuses heap pages that are already resident, which the
  counter does not see: a peak of a few KiB for a call that allocates 100 MiB).
"""

from __future__ import annotations

import ctypes
import gc
import re

import torch


def _pin_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """mallopt(M_MMAP_THRESHOLD, nbytes) in glibc: allocations from ``nbytes`` up are mmap'ed and unmapped
    on free (an explicit value also stops the dynamic raise). False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(-3, nbytes))  # -3 = M_MMAP_THRESHOLD


MMAP_THRESHOLD_PINNED = _pin_mmap_threshold()


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def peak_rss_bytes(fn) -> int | None:
    """Peak resident memory ``fn()`` held above what was resident before (Linux), or None elsewhere."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before


def peak_bytes(fn, device: str) -> int | None:
    """The most memory ``fn()`` held above its inputs on ``device`` ("cpu" or "cuda")."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return peak_rss_bytes(fn)
