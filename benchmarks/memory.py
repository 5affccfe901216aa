"""Peak memory of one call, measured the same way for every implementation in a benchmark.

* CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated before.
* CPU (Linux): the resident-set high-water mark VmHWM, reset through ``/proc/self/clear_refs`` right
  before the call, minus VmRSS before it. Large tensors are mmap'ed by the allocator and returned when
  freed, so this is the call's own peak.
"""

from __future__ import annotations

import gc
import re

import torch


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
