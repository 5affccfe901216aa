"""benchmarks/memory.py: the CPU peak sees memory the allocator had kept for reuse."""

import sys

import pytest
import torch

from benchmarks.memory import peak_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_cpu_peak_counts_reused_heap_blocks():
    mib = 2**20
    blocks = [torch.ones(6 * mib // 4) for _ in range(8)]  # 6 MiB blocks, freed: glibc keeps them for reuse
    del blocks
    for _ in range(3):
        peak = peak_bytes(lambda: [torch.ones(6 * mib // 4) for _ in range(4)], "cpu")  # 24 MiB alive at once
        assert 22 * mib <= peak <= 40 * mib, peak / mib
