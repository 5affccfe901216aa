"""The custom ops and the autograd around them. The ops are kernels without an autograd of their own (each
loss has one torch.autograd.Function over them): torch.library.opcheck checks their schema, fake kernel
and AOT dispatch on inputs that need no gradient; torch.compile(fullgraph) checks the losses with their
autograd, forward and backward, against eager."""

from __future__ import annotations

import pytest
import torch

from clinkd_kernels.loss import kd_loss, linear_kd_loss
from clinkd_kernels.loss.linear_op import _linear_kd_loss_op
from clinkd_kernels.loss.op import _kd_loss_op
from tests.loss.util import QUIET, pseudo_labels

pytestmark = QUIET


def _kd_args(backend, reduction, sparse, device="cpu"):
    n, v = 5, 37
    z = torch.randn(n, v, device=device)
    labels = torch.randint(0, v, (n,), device=device)
    labels[1] = -100
    t = torch.randn(n, v + 2, device=device)
    idx = lp = res = None
    if sparse:
        pl = pseudo_labels(t, 4, 0.5, v)
        t, idx, lp, res = None, pl.indices, pl.logprobs, pl.residual
    return (
        z,
        labels,
        t,
        idx,
        lp,
        res,
        torch.rand(n, device=device),
        0.5,
        0.5,
        1.0,
        -100,
        reduction,
        True,
        True,
        backend,
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("sparse", [False, True])
def test_opcheck_kd_loss_cpu(reduction, sparse):
    torch.library.opcheck(_kd_loss_op, _kd_args("cpu", reduction, sparse))


def test_opcheck_kd_loss_triton(interpreter):
    torch.library.opcheck(
        _kd_loss_op, _kd_args("triton", "sum", False, interpreter), test_utils=("test_schema", "test_faketensor")
    )


def _linear_args(reduction, sparse):
    n, hd, v = 7, 6, 29
    h, w, b = torch.randn(n, hd), torch.randn(v, hd), torch.randn(v)
    labels = torch.randint(0, v, (n,))
    th, tw = torch.randn(n, 5), torch.randn(v + 3, 5)
    idx = lp = res = None
    if sparse:
        pl = pseudo_labels(th @ tw.t(), 3, 1.0, v)
        th = tw = None
        idx, lp, res = pl.indices, pl.logprobs, pl.residual
    return (
        h,
        w,
        labels,
        b,
        th,
        tw,
        None,
        idx,
        lp,
        res,
        None,
        1.0,
        0.5,
        1.0,
        -100,
        reduction,
        False,
        3,
        True,
        True,
        True,
        "cpu",
    )


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("sparse", [False, True])
def test_opcheck_linear_kd_loss(reduction, sparse):
    torch.library.opcheck(_linear_kd_loss_op, _linear_args(reduction, sparse))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("sparse", [False, True])
def test_torch_compile_fullgraph(reduction, sparse):
    """kd_loss and linear_kd_loss (with a bias, components returned) trace into one graph (no graph
    breaks) and give the eager values and gradients, for a dense and a top-k teacher, reduced or per row."""
    n, hd, v = 9, 8, 53
    h = torch.randn(n, hd, requires_grad=True)
    w = torch.randn(v, hd, requires_grad=True)
    b = torch.randn(v, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    labels[2] = -100
    th, tw = torch.randn(n, 4), torch.randn(v, 4)
    if sparse:
        teacher = dict(teacher=pseudo_labels(th @ tw.t(), 5, 0.5, v))
        linear_teacher = teacher
    else:
        teacher = dict(teacher_logits=th @ tw.t())
        linear_teacher = dict(teacher_hidden=th, teacher_weight=tw)

    def step(h, w, b):
        logits = h @ w.t() + b
        a, kd_a, ce_a = kd_loss(
            logits, labels, temperature=0.5, reduction=reduction, return_components=True, backend="cpu", **teacher
        )
        c, kd_c, ce_c = linear_kd_loss(
            h,
            w,
            labels,
            bias=b,
            temperature=0.5,
            chunk_size=4,
            reduction=reduction,
            return_components=True,
            backend="cpu",
            **linear_teacher,
        )
        return (a + c).sum(), kd_a + kd_c, ce_a + ce_c

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out, kd_out, ce_out = compiled(h, w, b)
    out.backward()
    grads = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    want, kd_want, ce_want = step(h, w, b)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(kd_out, kd_want)
    torch.testing.assert_close(ce_out, ce_want)
    for got, t in zip(grads, (h, w, b)):
        torch.testing.assert_close(got, t.grad)
