"""linear_kd_loss (chunked lm_head + row kernel) against the float64 full-logits reference:
loss parts and the gradients of hidden, weight and bias."""

from __future__ import annotations

import functools

import pytest
import torch

from clinkd_kernels.loss import linear_kd_loss, linear_kd_loss_reference
from tests.loss.util import QUIET, check_linear, device_for, labels_with_ignored, pseudo_labels, small_blocks  # noqa: F401
from tests.numerics import assert_close

pytestmark = [*QUIET, pytest.mark.usefixtures("small_blocks")]

N, HD, V, HD_T, V_T = 37, 24, 301, 40, 311  # chunks of 16 rows leave a ragged last chunk of 5


def _inputs(dev, dtype=torch.float32, *, bias=True):
    hidden = torch.randn(N, HD, device=dev)
    weight = torch.randn(V, HD, device=dev) * 0.4
    out = {"hidden": hidden.to(dtype), "weight": weight.to(dtype)}
    out["bias"] = (torch.randn(V, device=dev) * 0.5).to(dtype) if bias else None
    return out


def _teacher(kind, dev, temperature, dtype=torch.float32, *, teacher_bias=True):
    th = torch.randn(N, HD_T, device=dev)
    tw = torch.randn(V_T, HD_T, device=dev) * 0.4
    tb = torch.randn(V_T, device=dev) * 0.5
    if kind == "dense":
        kw = {"teacher_hidden": th.to(dtype), "teacher_weight": tw.to(dtype)}
        if teacher_bias:
            kw["teacher_bias"] = tb.to(dtype)
        return kw
    logits = th @ tw.t() + tb
    return {"teacher": pseudo_labels(logits, 13, temperature, V)}


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
@pytest.mark.parametrize("teacher", ["dense", "sparse"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_fp32(backend, teacher, reduction, request):
    dev = device_for(backend, request)
    labels = labels_with_ignored(N, V, device=dev)
    opts = dict(
        temperature=0.5,
        alpha=0.6,
        beta=0.9,
        reduction=reduction,
        t2_scale=reduction == "sum",
        token_weights=torch.rand(N, device=dev) * 2,
        chunk_size=16,
    )
    check_linear(
        functools.partial(linear_kd_loss, backend=backend),
        _inputs(dev),
        labels,
        _teacher(teacher, dev, 0.5),
        opts,
        what=f"{backend} {teacher} {reduction}",
    )


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_temperatures_no_bias(backend, temperature, request):
    dev = device_for(backend, request)
    labels = labels_with_ignored(N, V, device=dev)
    check_linear(
        functools.partial(linear_kd_loss, backend=backend),
        _inputs(dev, bias=False),
        labels,
        _teacher("dense", dev, temperature, teacher_bias=False),
        dict(temperature=temperature, chunk_size=8),
        what=f"{backend} T={temperature} no bias",
    )


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
@pytest.mark.parametrize("teacher", ["dense", "sparse"])
def test_matches_reference_fp16(backend, teacher, request):
    dev = device_for(backend, request)
    labels = labels_with_ignored(N, V, device=dev)
    check_linear(
        functools.partial(linear_kd_loss, backend=backend),
        _inputs(dev, torch.float16),
        labels,
        _teacher(teacher, dev, 0.5, torch.float16),
        dict(temperature=0.5, chunk_size=16),
        what=f"{backend} fp16 {teacher}",
    )


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
def test_kd_only_default_chunk(backend, request):
    """beta = 0 and the default chunk size (one chunk at this size)."""
    dev = device_for(backend, request)
    labels = labels_with_ignored(N, V, device=dev)
    check_linear(
        functools.partial(linear_kd_loss, backend=backend),
        _inputs(dev),
        labels,
        _teacher("sparse", dev, 1.0),
        dict(alpha=1.0, beta=0.0),
        what=f"{backend} beta=0",
    )


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_rows_ignored(backend, reduction, request):
    dev = device_for(backend, request)
    inp = {k: v.requires_grad_() for k, v in _inputs(dev).items()}
    labels = torch.full((N,), -7, device=dev)
    loss, kd, ce = linear_kd_loss(
        inp["hidden"],
        inp["weight"],
        labels,
        bias=inp["bias"],
        ignore_index=-7,
        reduction=reduction,
        return_components=True,
        backend=backend,
        chunk_size=16,
        **_teacher("dense", dev, 1.0),
    )
    loss.sum().backward()
    for x in (loss, kd, ce, inp["hidden"].grad, inp["weight"].grad, inp["bias"].grad):
        assert torch.isfinite(x).all() and (x == 0).all()


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
@pytest.mark.parametrize("teacher", ["dense", "sparse"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ignored_rows_are_never_read(backend, teacher, reduction, request):
    """An ignore_index row skips the lm_head: NaN / inf in its hidden states (student or teacher) change
    nothing, bit for bit, against the same call with finite values there, and its grad_hidden row is 0."""
    dev = device_for(backend, request)
    labels = labels_with_ignored(N, V, n_ignored=11, device=dev)
    ignored = labels == -100
    clean, tkw = _inputs(dev), _teacher(teacher, dev, 0.5)
    dirty = dict(clean, hidden=clean["hidden"].clone())
    dirty["hidden"][ignored] = float("nan")
    dirty_t = dict(tkw)
    if teacher == "dense":
        dirty_t["teacher_hidden"] = tkw["teacher_hidden"].clone()
        dirty_t["teacher_hidden"][ignored] = float("inf")
    results = []
    for inp, t in ((clean, tkw), (dirty, dirty_t)):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
        loss, kd, ce = linear_kd_loss(
            leaves["hidden"],
            leaves["weight"],
            labels,
            bias=leaves["bias"],
            temperature=0.5,
            reduction=reduction,
            return_components=True,
            chunk_size=16,
            backend=backend,
            **t,
        )
        loss.sum().backward()
        results.append((loss, kd, ce, leaves["hidden"].grad, leaves["weight"].grad, leaves["bias"].grad))
    for name, a, b in zip(("loss", "kd", "ce", "grad hidden", "grad weight", "grad bias"), *results):
        assert torch.isfinite(b).all(), f"{name}: an ignored row's NaN reached the result"
        assert torch.equal(a, b), f"{name} differs when the ignored rows hold NaN"
    assert (results[1][3][ignored] == 0).all()
    assert results[0][3][~ignored].abs().sum() > 0


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
@pytest.mark.parametrize(
    ("dtype", "reduction"), [(torch.float32, "mean"), (torch.float32, "none"), (torch.float16, "mean")]
)
def test_dense_teacher_in_one_chunk(backend, dtype, reduction, request):
    """One chunk whose rows fit in Hd: the teacher's logits are formed in grad_W's buffer before the
    gradient is written there (fp32; fp16 weights keep them apart, grad_W being fp32)."""
    dev = device_for(backend, request)
    n, hd, vocab = 21, 40, 257
    inputs = {
        "hidden": torch.randn(n, hd, device=dev).to(dtype),
        "weight": (torch.randn(vocab, hd, device=dev) * 0.3).to(dtype),
        "bias": (torch.randn(vocab, device=dev) * 0.5).to(dtype),
    }
    tkw = {
        "teacher_hidden": torch.randn(n, 48, device=dev).to(dtype),
        "teacher_weight": (torch.randn(vocab + 5, 48, device=dev) * 0.3).to(dtype),
    }
    labels = labels_with_ignored(n, vocab, n_ignored=4, device=dev)
    check_linear(
        functools.partial(linear_kd_loss, backend=backend),
        inputs,
        labels,
        tkw,
        dict(temperature=0.7, reduction=reduction, chunk_size=32),
        what=f"{backend} one chunk {dtype} {reduction}",
    )


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
def test_only_weight_needs_grad(backend, request):
    """Frozen hidden states and bias (e.g. tuning the lm_head alone): only grad_W is made, and it is right."""
    dev = device_for(backend, request)
    inp = _inputs(dev)
    labels = labels_with_ignored(N, V, device=dev)
    tkw = _teacher("dense", dev, 1.0)
    w = inp["weight"].clone().requires_grad_()
    linear_kd_loss(inp["hidden"], w, labels, bias=inp["bias"], backend=backend, chunk_size=16, **tkw).backward()
    w64 = inp["weight"].double().requires_grad_()
    linear_kd_loss_reference(
        inp["hidden"].double(), w64, labels, bias=inp["bias"].double(), **{k: v.double() for k, v in tkw.items()}
    ).backward()
    wb = inp["weight"].clone().requires_grad_()
    linear_kd_loss_reference(inp["hidden"], wb, labels, bias=inp["bias"], **tkw).backward()
    assert_close("grad weight", w.grad, w64.grad, wb.grad)


def test_teacher_gets_no_gradient():
    inp = _inputs(torch.device("cpu"))
    kw = _teacher("dense", torch.device("cpu"), 1.0)
    for v in kw.values():
        v.requires_grad_()
    labels = labels_with_ignored(N, V)
    linear_kd_loss(inp["hidden"].requires_grad_(), inp["weight"], labels, backend="cpu", **kw).backward()
    assert all(v.grad is None for v in kw.values())
    assert inp["hidden"].grad is not None


def test_second_backward_through_same_graph_raises():
    inp = _inputs(torch.device("cpu"))
    h = inp["hidden"].requires_grad_()
    loss = linear_kd_loss(h, inp["weight"], labels_with_ignored(N, V), alpha=0.0, backend="cpu")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_none_reduction_backward_can_repeat():
    """reduction="none" recomputes in backward, so retain_graph + a second backward is fine."""
    inp = _inputs(torch.device("cpu"))
    h = inp["hidden"].requires_grad_()
    loss = linear_kd_loss(
        h, inp["weight"], labels_with_ignored(N, V), alpha=0.0, reduction="none", backend="cpu", chunk_size=16
    )
    loss.sum().backward(retain_graph=True)
    first = h.grad.clone()
    loss.sum().backward()
    torch.testing.assert_close(h.grad, 2 * first)
