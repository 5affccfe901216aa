"""Peak memory of one call, measured the same way for every implementation in a benchmark.

* CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated before.
* CPU (Linux): the resident-set high-water mark VmHWM, reset through ``/proc/self/clear_refs`` right
  before the call, minus VmRSS before it. Free heap memory is first handed back to the system
  (``malloc_trim``): glibc keeps freed blocks of up to 32 MiB resident for reuse, and a call that
  reused them would add nothing to the resident set (a peak of a few KiB for a call that allocates
  100 MiB). The trim changes no allocator setting, so the timed runs are unaffected.
"""

from __future__ import annotations

import ctypes
import gc
import re

import torch


def _trim_heap() -> None:
    """glibc's malloc_trim(0): return free heap pages to the system (no-op without glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def peak_rss_bytes(fn) -> int | None:
    """Peak resident memory ``fn()`` held above what was resident before (Linux), or None elsewhere."""
    gc.collect()
    _trim_heap()
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
