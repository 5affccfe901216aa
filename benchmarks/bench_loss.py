"""Fused distillation loss (lm_head + temperature KL + CE), forward + backward, against peers.

Implementations, side by side per shape:

* ``clinkd``       linear_kd_loss with a dense teacher (chunked lm_head; Triton row kernel on CUDA,
                   the chunked PyTorch path on CPU)
* ``clinkd-topk``  the same with top-64 pseudo-labels instead of the teacher's lm_head
* ``naive``        what a trainer writes: full student and teacher logits, F.kl_div + F.cross_entropy
* ``compiled``     ``torch.compile`` of ``naive`` (the plain formula, fused by Inductor)
* ``liger``        Liger-Kernel's chunked ``LigerFusedLinearJSDLoss`` (skipped unless importable) with
                   beta = 0, which in Liger is the forward KL(teacher ‖ student) — ours; beta = 1 is the
                   reverse KL(student ‖ teacher), a different loss. Weights mapped: weight_soft_loss =
                   α/(α+β), weight_hard_loss = β/(α+β); its hard loss is the CE at T = 1, as ours.

Every peer's loss is asserted equal to clinkd's on the same inputs (relative 1e-4 in fp32, 3e-2 in
bf16) before it is timed; ``clinkd-topk`` distils from a sparse teacher, a different value on purpose.
CE only (α = 0, ``test_linear_ce_loss``): clinkd's ``linear_kd_loss`` vs ``naive`` F.cross_entropy on
full logits, its ``compiled`` form and Cut Cross-Entropy's ``linear_cross_entropy`` (``cce``: its Triton
kernel on CUDA; on CPU its ``torch_compile`` implementation, as it labels it).

Shapes: Liger's distillation benchmark (N=8192, Hd=2048, teacher Hd=4096, V=128256) and Qwen2-VL
2B-student / 7B-teacher (Hd=1536, teacher Hd=3584, V=151936) in bf16 on CUDA; on CPU in fp32 a small
shape (N=512, Hd=256, teacher Hd=512, V=16384) and the Qwen2-VL vocabulary with fewer tokens (N=128,
Hd=1536, teacher Hd=3584, V=151936). Floor: the lm_head matmul FLOPs 2·N·V·(3·Hd + Hd_t) (student forward, its two
backward
matmuls, teacher forward) at the device's measured matmul rate, N counting the rows that have a label
(one in nine is ignore_index here; those need no lm_head product: clinkd skips them, the peers compute
them). ``extra_info["peak_bytes"]``: the most
memory one forward+backward held above its inputs, the gradients it makes included (CUDA:
max_memory_allocated; CPU: the peak-RSS counter reset before the run, see benchmarks/memory.py). The
previous gradients are freed before the count starts, and clinkd's CPU buffer cache is emptied, so its
weight gradient is a fresh buffer there as every peer's is (timed runs reuse it, as a training loop does).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import sync
from benchmarks.floors import compute_floor_s, record
from benchmarks.memory import peak_bytes
from clinkd_kernels import empty_cpu_cache
from clinkd_kernels.loss import linear_kd_loss
from clinkd_kernels.topk import PseudoLabels

T, ALPHA, BETA = 0.5, 0.5, 1.0
SHAPES = {
    # name: (N, Hd, Hd_t, V, dtype)
    "cpu": [
        ("cpu-small", 512, 256, 512, 16384, torch.float32),
        ("cpu-qwen2vl", 128, 1536, 3584, 151936, torch.float32),
    ],
    "cuda": [
        ("liger", 8192, 2048, 4096, 128256, torch.bfloat16),
        ("qwen2vl-2b/7b", 8192, 1536, 3584, 151936, torch.bfloat16),
    ],
}
IMPLS = ["clinkd", "clinkd-topk", "naive", "compiled", "liger"]


def naive_loss(hidden, weight, labels, th, tw):
    vocab = weight.shape[0]
    logits = (hidden @ weight.t()).float()
    with torch.no_grad():
        log_p = F.log_softmax((th @ tw[:vocab].t()).float() / T, dim=-1)
    log_q = F.log_softmax(logits / T, dim=-1)
    valid = labels != -100
    kd = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    kd = (kd * valid).sum() / valid.sum()
    ce = F.cross_entropy(logits, labels, ignore_index=-100)
    return (ALPHA * kd + BETA * ce) / (ALPHA + BETA)


def _topk_from_teacher(th, tw, vocab, k=64, rows=1024):
    """Pseudo-labels of the teacher's lm_head logits, made chunk-wise (not timed)."""
    parts = []
    with torch.no_grad():
        for a in range(0, th.shape[0], rows):
            logp = torch.log_softmax((th[a : a + rows] @ tw[:vocab].t()).float() / T, dim=-1)
            top, idx = logp.topk(k, dim=-1)
            parts.append((idx.int(), top, (1 - top.exp().sum(-1)).clamp(min=0)))
    idx, lp, res = (torch.cat(x) for x in zip(*parts))
    zeros = torch.zeros_like(res)
    return PseudoLabels(idx, lp, zeros, zeros, res)


_COMPILED = {}


def _compiled(fn):
    """torch.compile of a plain formula, made once per process (its compile is the warm-up's)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def _liger_fn():
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    loss_fn = chunked.LigerFusedLinearJSDLoss(
        weight_hard_loss=BETA / (ALPHA + BETA), weight_soft_loss=ALPHA / (ALPHA + BETA), beta=0.0, temperature=T
    )

    def run(hidden, weight, labels, th, tw):
        tw = tw[: weight.shape[0]]
        try:
            return loss_fn(hidden, weight, th, tw, labels, None, None)
        except TypeError:  # versions before the bias arguments
            return loss_fn(hidden, weight, th, tw, labels)

    return run


@pytest.mark.parametrize("shape_index", [0, 1])
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_kd_loss(benchmark, device, impl, shape_index):
    if shape_index >= len(SHAPES[device]):
        pytest.skip("no such shape on this device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    name, n, hd, hd_t, vocab, dtype = SHAPES[device][shape_index]
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, hd, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(vocab, hd, device=device, dtype=dtype, generator=g) * hd**-0.5).requires_grad_()
    th = torch.randn(n, hd_t, device=device, dtype=dtype, generator=g)
    tw = torch.randn(vocab, hd_t, device=device, dtype=dtype, generator=g) * hd_t**-0.5
    labels = torch.randint(0, vocab, (n,), device=device, generator=g)
    labels[::9] = -100

    if impl == "clinkd":
        fn = functools.partial(
            linear_kd_loss, teacher_hidden=th, teacher_weight=tw, temperature=T, alpha=ALPHA, beta=BETA
        )
        loss_fn = lambda: fn(hidden, weight, labels)  # noqa: E731
    elif impl == "clinkd-topk":
        teacher = _topk_from_teacher(th, tw, vocab)
        loss_fn = lambda: linear_kd_loss(  # noqa: E731
            hidden, weight, labels, teacher=teacher, temperature=T, alpha=ALPHA, beta=BETA
        )
    elif impl == "naive":
        loss_fn = lambda: naive_loss(hidden, weight, labels, th, tw)  # noqa: E731
    elif impl == "compiled":
        compiled = _compiled(naive_loss)
        loss_fn = lambda: compiled(hidden, weight, labels, th, tw)  # noqa: E731
    else:
        liger = _liger_fn()
        loss_fn = lambda: liger(hidden, weight, labels, th, tw)  # noqa: E731
    if impl not in ("clinkd", "clinkd-topk"):  # a peer must compute clinkd's loss on these inputs
        _check_same_value(
            impl,
            loss_fn,
            lambda: linear_kd_loss(
                hidden, weight, labels, teacher_hidden=th, teacher_weight=tw, temperature=T, alpha=ALPHA, beta=BETA
            ),
            dtype,
        )

    def run():
        hidden.grad = weight.grad = None
        loss_fn().backward()
        sync(device)

    labelled = int((labels != -100).sum())
    flops = 2 * labelled * vocab * (3 * hd + (0 if impl == "clinkd-topk" else hd_t))  # top-k: no teacher lm_head
    run()  # warm-up (Triton compile, torch.compile for Liger)
    peak = _peak_with_gradients(hidden, weight, loss_fn, device)
    benchmark.group = (
        f"linear_kd_loss {device} {name} N={n} Hd={hd} Hd_t={hd_t} V={vocab} {str(dtype).replace('torch.', '')} fwd+bwd"
    )
    record(
        benchmark,
        floor_s=compute_floor_s(flops, device, dtype),
        flops=flops,
        op="linear_kd_loss",
        impl=impl,
        device=device,
        shape=f"N={n},Hd={hd},Hd_t={hd_t},V={vocab}",
        peak_bytes=peak,
        peak_gib=None if peak is None else round(peak / 2**30, 3),
    )
    benchmark.pedantic(
        run, rounds=(9 if n * vocab < 2**24 else 7) if device == "cpu" else 10, warmup_rounds=0, iterations=1
    )


def _peak_with_gradients(hidden, weight, loss_fn, device):
    """Peak memory of one forward+backward above its inputs, its gradients included (see the module doc)."""
    hidden.grad = weight.grad = None
    empty_cpu_cache()

    def call():
        loss_fn().backward()
        sync(device)

    return peak_bytes(call, device)


def _check_same_value(impl, peer, ours, dtype):
    with torch.no_grad():
        got, want = float(peer()), float(ours())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert abs(got - want) <= tol * abs(want), f"{impl} computes {got} where clinkd computes {want}: another loss"


def naive_ce(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=-100)


@pytest.mark.parametrize("shape_index", [0, 1])
@pytest.mark.parametrize("impl", ["clinkd", "naive", "compiled", "cce"])
def test_linear_ce_loss(benchmark, device, impl, shape_index):
    """Cross-entropy alone through the lm_head (α = 0): the case Cut Cross-Entropy is built for."""
    if shape_index >= len(SHAPES[device]):
        pytest.skip("no such shape on this device")
    name, n, hd, _, vocab, dtype = SHAPES[device][shape_index]
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, hd, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(vocab, hd, device=device, dtype=dtype, generator=g) * hd**-0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,), device=device, generator=g)
    labels[::9] = -100
    ours = lambda: linear_kd_loss(hidden, weight, labels, alpha=0.0, beta=1.0)  # noqa: E731
    if impl == "clinkd":
        loss_fn = ours
    elif impl == "naive":
        loss_fn = lambda: naive_ce(hidden, weight, labels)  # noqa: E731
    elif impl == "compiled":
        compiled = _compiled(naive_ce)
        loss_fn = lambda: compiled(hidden, weight, labels)  # noqa: E731
    else:
        cce = pytest.importorskip("cut_cross_entropy")
        how = "cce" if device == "cuda" else "torch_compile"  # its Triton kernel needs CUDA
        loss_fn = lambda: cce.linear_cross_entropy(hidden, weight, labels, impl=how)  # noqa: E731
    if impl != "clinkd":
        _check_same_value(impl, loss_fn, ours, dtype)

    def run():
        hidden.grad = weight.grad = None
        loss_fn().backward()
        sync(device)

    flops = 2 * int((labels != -100).sum()) * vocab * 3 * hd
    run()
    peak = _peak_with_gradients(hidden, weight, loss_fn, device)
    benchmark.group = (
        f"linear_ce_loss {device} {name} N={n} Hd={hd} V={vocab} {str(dtype).replace('torch.', '')} fwd+bwd"
    )
    record(
        benchmark,
        floor_s=compute_floor_s(flops, device, dtype),
        flops=flops,
        op="linear_ce_loss",
        impl=impl if impl != "cce" or device == "cuda" else "cce-torch_compile",
        device=device,
        shape=f"N={n},Hd={hd},V={vocab}",
        peak_bytes=peak,
        peak_gib=None if peak is None else round(peak / 2**30, 3),
    )
    benchmark.pedantic(
        run, rounds=(9 if n * vocab < 2**24 else 7) if device == "cpu" else 10, warmup_rounds=0, iterations=1
    )
