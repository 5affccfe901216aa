"""Peak memory of one forward+backward of the distillation loss on CPU, measured in a fresh process.

    python -m tests.loss.memory_probe {naive|fused} N HD V HD_T [CHUNK]   → one JSON line

Method: after the inputs exist (all written, so resident), ``benchmarks.memory.peak_rss_bytes`` resets
the kernel's peak-RSS counter and measures forward+backward: the most memory the step held above its
inputs, whatever allocated it (torch tensors, BLAS workspaces, autograd buffers). Every buffer is
written, so allocated = resident. A fresh process keeps other tests' memory out of the numbers.

Both paths compute the same loss: dense teacher, T = 0.5, alpha = 0.5, beta = 1, mean, 1 row in 7
ignored. "naive" is the benchmark's plain-PyTorch form a trainer writes (``benchmarks.bench_loss.naive_loss``:
full student and teacher logits, F.kl_div + F.cross_entropy).
"""

from __future__ import annotations

import functools
import json
import sys
import time

import torch

from benchmarks.bench_loss import ALPHA, BETA, T, naive_loss
from benchmarks.memory import peak_rss_bytes
from clinkd_kernels.loss import linear_kd_loss


def fused(hidden, weight, labels, th, tw, chunk_size=None):
    return linear_kd_loss(
        hidden,
        weight,
        labels,
        teacher_hidden=th,
        teacher_weight=tw,
        temperature=T,
        alpha=ALPHA,
        beta=BETA,
        chunk_size=chunk_size,
        backend="cpu",
    )


def _run(path, hidden, weight, labels, th, tw, chunk_size):
    fn = naive_loss if path == "naive" else functools.partial(fused, chunk_size=chunk_size)
    loss = fn(hidden, weight, labels, th, tw)
    loss.backward()
    return loss


def measure(path: str, n: int, hd: int, vocab: int, hd_t: int, chunk_size: int | None = None) -> dict:
    # One tiny step first: library initialisation (BLAS buffers, op registration, dispatch caches) is
    # paid once per process, not per step, and must not count as the step's memory.
    _run(
        path,
        torch.randn(8, 16, requires_grad=True),
        torch.randn(64, 16, requires_grad=True),
        torch.randint(0, 64, (8,)),
        torch.randn(8, 24),
        torch.randn(64, 24),
        4,
    )
    torch.manual_seed(0)
    hidden = torch.randn(n, hd).requires_grad_()
    weight = (torch.randn(vocab, hd) * hd**-0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,))
    labels[::7] = -100
    th = torch.randn(n, hd_t)
    tw = torch.randn(vocab, hd_t) * hd_t**-0.5  # random 7B-shaped teacher head
    result = {}

    def step():
        t0 = time.perf_counter()
        result["loss"] = _run(path, hidden, weight, labels, th, tw, chunk_size)
        result["seconds"] = time.perf_counter() - t0

    peak = peak_rss_bytes(step)
    loss, seconds = result["loss"], result["seconds"]
    return {
        "path": path,
        "n": n,
        "hd": hd,
        "vocab": vocab,
        "hd_t": hd_t,
        "peak_bytes": peak,
        "seconds": seconds,
        "loss": float(loss.detach()),
    }


if __name__ == "__main__":
    a = sys.argv[1:]
    out = measure(a[0], *map(int, a[1:5]), chunk_size=int(a[5]) if len(a) > 5 else None)
    print(json.dumps(out))
