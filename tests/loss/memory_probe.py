"""Peak memory of one forward+backward of the distillation loss on CPU, measured in a fresh process.

    python -m tests.loss.memory_probe {naive|fused} N HD V HD_T [CHUNK]   → one JSON line

Method: after the inputs exist (all written, so resident), the kernel's peak-RSS counter VmHWM is
reset (``echo 5 > /proc/self/clear_refs``) and the current VmRSS recorded; after forward+backward,
peak = VmHWM − that RSS: the most memory the step held above its inputs, whatever allocated it (torch
tensors, BLAS workspaces, autograd buffers). Sound here because torch's CPU allocator does not cache:
vocabulary-sized buffers (> 32 MiB) are mmap'd and go back to the OS when freed, and every buffer is
written, so allocated = resident. A fresh process keeps other tests' memory out of the numbers.

Both paths compute the same loss: dense teacher, T = 0.5, alpha = 0.5, beta = 1, mean, 1 row in 7
ignored. "naive" is the plain-PyTorch form a trainer writes (full student and teacher logits,
F.kl_div + F.cross_entropy), with no needless references held.
"""

from __future__ import annotations

import functools
import gc
import json
import re
import sys
import time

import torch
import torch.nn.functional as F

from clinkd_kernels.loss import linear_kd_loss

T, ALPHA, BETA = 0.5, 0.5, 1.0


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def naive(hidden, weight, labels, th, tw):
    vocab = weight.shape[0]
    logits = hidden @ weight.t()
    with torch.no_grad():
        log_p = F.log_softmax(th @ tw[:vocab].t() / T, dim=-1)
    log_q = F.log_softmax(logits / T, dim=-1)
    valid = labels != -100
    kd = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    kd = (kd * valid).sum() / valid.sum()
    ce = F.cross_entropy(logits, labels, ignore_index=-100)
    return (ALPHA * kd + BETA * ce) / (ALPHA + BETA)


def fused(hidden, weight, labels, th, tw, chunk_size=None):
    return linear_kd_loss(hidden, weight, labels, teacher_hidden=th, teacher_weight=tw, temperature=T,
                          alpha=ALPHA, beta=BETA, chunk_size=chunk_size, backend="cpu")


def _run(path, hidden, weight, labels, th, tw, chunk_size):
    fn = naive if path == "naive" else functools.partial(fused, chunk_size=chunk_size)
    loss = fn(hidden, weight, labels, th, tw)
    loss.backward()
    return loss


def measure(path: str, n: int, hd: int, vocab: int, hd_t: int, chunk_size: int | None = None) -> dict:
    # One tiny step first: library initialisation (BLAS buffers, op registration, dispatch caches) is
    # paid once per process, not per step, and must not count as the step's memory.
    _run(path, torch.randn(8, 16, requires_grad=True), torch.randn(64, 16, requires_grad=True),
         torch.randint(0, 64, (8,)), torch.randn(8, 24), torch.randn(64, 24), 4)
    torch.manual_seed(0)
    hidden = torch.randn(n, hd).requires_grad_()
    weight = (torch.randn(vocab, hd) * hd ** -0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,))
    labels[::7] = -100
    th = torch.randn(n, hd_t)
    tw = torch.randn(vocab, hd_t) * hd_t ** -0.5  # random 7B-shaped teacher head
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    loss = _run(path, hidden, weight, labels, th, tw, chunk_size)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") - rss0
    return {"path": path, "n": n, "hd": hd, "vocab": vocab, "hd_t": hd_t, "peak_bytes": peak,
            "inputs_bytes": rss0, "seconds": seconds, "loss": float(loss.detach())}


if __name__ == "__main__":
    a = sys.argv[1:]
    out = measure(a[0], *map(int, a[1:5]), chunk_size=int(a[5]) if len(a) > 5 else None)
    print(json.dumps(out))
