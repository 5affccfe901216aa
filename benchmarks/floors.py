"""Physical floors for the benchmarks: the time an op could take if it only moved its bytes at the
machine's bandwidth (or only did its FLOPs at the machine's matmul rate).

Rates are measured on the machine running the benchmark, so a floor is always of the same machine
as the time it is compared with.
"""

from __future__ import annotations

import functools
import time

import torch


def _best_time(fn, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def bandwidth_bytes_per_s(device: str = "cpu") -> float:
    """Copy bandwidth (read + write bytes per second) of ``device``, from a 256 MiB copy."""
    n = 64 * 1024 * 1024
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / _best_time(lambda: dst.copy_(src))


@functools.cache
def matmul_flops_per_s(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Dense matmul rate of ``device`` for ``dtype``, from square matmuls."""
    n = 4096 if device != "cpu" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _best_time(lambda: a @ b)


def memory_floor_s(nbytes: float, device: str = "cpu") -> float:
    return nbytes / bandwidth_bytes_per_s(device)


def compute_floor_s(flops: float, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    return flops / matmul_flops_per_s(device, dtype)


def record(benchmark, *, floor_s: float, **info) -> None:
    """Attach the floor and ``ours/floor`` (filled in after the run by the renderer) to a benchmark."""
    benchmark.extra_info["floor_s"] = floor_s
    benchmark.extra_info.update(info)
