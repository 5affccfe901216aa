"""linear_kd_loss (chunked lm_head + row kernel) against the float64 full-logits reference:
loss parts and the gradients of hidden, weight and bias."""

from __future__ import annotations

import functools

import pytest
import torch

from clinkd_kernels.loss import linear_kd_loss, linear_kd_loss_reference
from tests.numerics import assert_close
from tests.loss.util import QUIET, device_for, check_linear, labels_with_ignored, pseudo_labels, small_blocks  # noqa: F401

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
    opts = dict(temperature=0.5, alpha=0.6, beta=0.9, reduction=reduction, t2_scale=reduction == "sum",
                token_weights=torch.rand(N, device=dev) * 2, chunk_size=16)
    check_linear(functools.partial(linear_kd_loss, backend=backend), _inputs(dev), labels,
                 _teacher(teacher, dev, 0.5), opts, what=f"{backend} {teacher} {reduction}")


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_temperatures_no_bias(backend, temperature, request):
    dev = device_for(backend, request)
    labels = labels_with_ignored(N, V, device=dev)
    check_linear(functools.partial(linear_kd_loss, backend=backend), _inputs(dev, bias=False), labels,
                 _teacher("dense", dev, temperature, teacher_bias=False),
                 dict(temperature=temperature, chunk_size=8), what=f"{backend} T={temperature} no bias")


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
@pytest.mark.parametrize("teacher", ["dense", "sparse"])
def test_matches_reference_fp16(backend, teacher, request):
    dev = device_for(backend, request)
    labels = labels_with_ignored(N, V, device=dev)
    check_linear(functools.partial(linear_kd_loss, backend=backend), _inputs(dev, torch.float16), labels,
                 _teacher(teacher, dev, 0.5, torch.float16), dict(temperature=0.5, chunk_size=16),
                 what=f"{backend} fp16 {teacher}")


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
def test_kd_only_default_chunk(backend, request):
    """beta = 0 and the default chunk size (one chunk at this size)."""
    dev = device_for(backend, request)
    labels = labels_with_ignored(N, V, device=dev)
    check_linear(functools.partial(linear_kd_loss, backend=backend), _inputs(dev), labels,
                 _teacher("sparse", dev, 1.0), dict(alpha=1.0, beta=0.0), what=f"{backend} beta=0")


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_rows_ignored(backend, reduction, request):
    dev = device_for(backend, request)
    inp = {k: v.requires_grad_() for k, v in _inputs(dev).items()}
    labels = torch.full((N,), -7, device=dev)
    loss, kd, ce = linear_kd_loss(inp["hidden"], inp["weight"], labels, bias=inp["bias"], ignore_index=-7,
                                  reduction=reduction, return_components=True, backend=backend, chunk_size=16,
                                  **_teacher("dense", dev, 1.0))
    loss.sum().backward()
    for x in (loss, kd, ce, inp["hidden"].grad, inp["weight"].grad, inp["bias"].grad):
        assert torch.isfinite(x).all() and (x == 0).all()


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
    linear_kd_loss_reference(inp["hidden"].double(), w64, labels, bias=inp["bias"].double(),
                             **{k: v.double() for k, v in tkw.items()}).backward()
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
    loss = linear_kd_loss(h, inp["weight"], labels_with_ignored(N, V), alpha=0.0, reduction="none", backend="cpu",
                          chunk_size=16)
    loss.sum().backward(retain_graph=True)
    first = h.grad.clone()
    loss.sum().backward()
    torch.testing.assert_close(h.grad, 2 * first)
