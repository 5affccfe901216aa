"""kd_loss (Triton kernel under the interpreter, and the chunked PyTorch "cpu" path) against the float64 reference."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from clinkd_kernels.loss import kd_loss
from tests.loss.util import QUIET, check_kd_loss, device_for, labels_with_ignored, pseudo_labels, small_blocks  # noqa: F401

pytestmark = [*QUIET, pytest.mark.usefixtures("small_blocks")]

N, V = 29, 301  # odd rows; V spans three 128-wide tiles with a ragged tail


def _fn(backend):
    return functools.partial(kd_loss, backend=backend)


def _teacher(kind, n, vocab, temperature, device, *, k=11, scale=2.0, extra_cols=7):
    t = torch.randn(n, vocab + extra_cols, device=device) * scale
    if kind == "dense":
        return {"teacher_logits": t}
    return {"teacher": pseudo_labels(t, k, temperature, vocab)}


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
@pytest.mark.parametrize("teacher", ["dense", "sparse"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_fp32(backend, teacher, temperature, reduction, request):
    """Every reduction and temperature; ignored rows, token weights, teacher wider than the student;
    t2_scale on for T = 2."""
    dev = device_for(backend, request)
    z = torch.randn(N, V, device=dev) * 2
    labels = labels_with_ignored(N, V, device=dev)
    opts = dict(
        temperature=temperature,
        alpha=0.7,
        beta=0.4,
        reduction=reduction,
        t2_scale=temperature == 2.0,
        token_weights=torch.rand(N, device=dev) * 2,
    )
    check_kd_loss(
        _fn(backend),
        z,
        labels,
        _teacher(teacher, N, V, temperature, dev),
        opts,
        what=f"{backend} {teacher} T={temperature} {reduction}",
    )


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
@pytest.mark.parametrize("teacher", ["dense", "sparse"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_reference_fp16(backend, teacher, reduction, request):
    dev = device_for(backend, request)
    z = (torch.randn(N, V, device=dev) * 2).half()
    labels = labels_with_ignored(N, V, device=dev)
    kw = _teacher(teacher, N, V, 0.5, dev)
    if teacher == "dense":
        kw["teacher_logits"] = kw["teacher_logits"].half()
    check_kd_loss(
        _fn(backend),
        z,
        labels,
        kw,
        dict(temperature=0.5, reduction=reduction),
        what=f"{backend} fp16 {teacher} {reduction}",
    )


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
@pytest.mark.parametrize("teacher", ["dense", "sparse"])
def test_kd_only_beta_zero(backend, teacher, request):
    dev = device_for(backend, request)
    z = torch.randn(N, V, device=dev)
    labels = labels_with_ignored(N, V, device=dev)
    check_kd_loss(
        _fn(backend),
        z,
        labels,
        _teacher(teacher, N, V, 2.0, dev),
        dict(temperature=2.0, alpha=1.0, beta=0.0),
        what=f"{backend} beta=0",
    )


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
def test_ce_only_without_teacher(backend, request):
    dev = device_for(backend, request)
    z = torch.randn(N, V, device=dev)
    labels = labels_with_ignored(N, V, device=dev)
    loss = check_kd_loss(_fn(backend), z, labels, {}, dict(alpha=0.0, beta=1.0), what=f"{backend} CE only")
    ce = torch.nn.functional.cross_entropy(z.double(), labels, ignore_index=-100)
    assert abs(loss.item() - ce.item()) < 1e-5 * max(1.0, abs(ce.item()))


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
@pytest.mark.parametrize("k", [1, 2, 64, 256])
@pytest.mark.parametrize("mass", ["residual~0", "flat"])
def test_sparse_topk_sizes_and_residual_extremes(backend, k, mass, request):
    """k from 1 to 256. residual~0: a teacher so peaked that the top k hold all but ~1e-9 of the mass
    (r log r → 0). flat: a nearly uniform teacher, so the residual is 1 − k/V (0.997 for k = 1)."""
    dev = device_for(backend, request)
    n = 17
    t = torch.randn(n, V, device=dev)
    if mass == "residual~0":
        order = torch.randn(n, V, device=dev).argsort(dim=1)
        t = torch.full((n, V), -40.0, device=dev).scatter_(1, order[:, :k], torch.randn(n, k, device=dev) * 0.5)
        t.scatter_(1, order[:, k : k + 3], -20.0)  # a little mass left outside the top k: r ~ 1e-9
    else:
        t = t * 0.01
    pl = pseudo_labels(t, k, 1.0, V)
    r = pl.residual
    if mass == "residual~0":
        assert float(r.max()) < 1e-6
    else:
        assert float(r.min()) > 1 - (k + 1) / V * 1.1
    z = torch.randn(n, V, device=dev) * 2
    labels = labels_with_ignored(n, V, device=dev)
    check_kd_loss(
        _fn(backend), z, labels, {"teacher": pl}, dict(temperature=1.0, reduction="sum"), what=f"{backend} k={k} {mass}"
    )


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
def test_sparse_student_mass_all_on_topk(backend, request):
    """The student puts all but ~e^-40 of its mass on the teacher's top k (Σ q_idx → 1): the residual
    bucket's log(1 − Σ q_idx) must come out right, not from a cancelling 1 − Σ."""
    dev = device_for(backend, request)
    n, k = 13, 5
    t = torch.randn(n, V, device=dev) * 2
    pl = pseudo_labels(t, k, 1.0, V)
    z = torch.randn(n, V, device=dev)
    z.scatter_(1, pl.indices.long(), 40.0 + torch.randn(n, k, device=dev))
    labels = labels_with_ignored(n, V, device=dev)
    check_kd_loss(
        _fn(backend), z, labels, {"teacher": pl}, dict(temperature=1.0, reduction="none"), what=f"{backend} Σq_idx→1"
    )


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
@pytest.mark.parametrize("teacher", ["dense", "sparse"])
def test_negative_infinite_student_logits(backend, teacher, request):
    """-inf student logits (masked vocabulary): a whole 128-wide tile, scattered columns, the last column.
    The teacher gives those columns no mass (dense: -inf there too; sparse: top k elsewhere)."""
    dev = device_for(backend, request)
    z = torch.randn(N, V, device=dev) * 2
    masked = torch.zeros(V, dtype=torch.bool, device=dev)
    masked[128:256] = True
    masked[torch.randperm(V, device=dev)[:20]] = True
    masked[V - 1] = True
    z[:, masked] = float("-inf")
    t = torch.randn(N, V + 3, device=dev) * 2
    t[:, :V][:, masked] = float("-inf")
    labels = torch.nonzero(~masked).flatten()[torch.randint(0, int((~masked).sum()), (N,), device=dev)]
    labels[3] = -100
    kw = {"teacher_logits": t} if teacher == "dense" else {"teacher": pseudo_labels(t, 9, 0.5, V)}
    check_kd_loss(_fn(backend), z, labels, kw, dict(temperature=0.5, reduction="none"), what=f"{backend} -inf")


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
def test_teacher_mass_on_masked_student_column_is_infinite(backend, grad, request):
    """Documented behaviour: KL is +inf when the teacher gives mass where the student has -inf (also when
    the gradient is computed in the same pass)."""
    dev = device_for(backend, request)
    z = torch.randn(4, V, device=dev)
    z[:, 7] = float("-inf")
    z.requires_grad_(grad)
    t = torch.randn(4, V, device=dev)
    labels = torch.randint(8, V, (4,), device=dev)
    loss, kd, ce = kd_loss(z, labels, teacher_logits=t, reduction="none", return_components=True, backend=backend)
    assert torch.isinf(kd).all() and (kd > 0).all()
    assert torch.isfinite(ce).all()


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("teacher", ["dense", "sparse"])
def test_all_rows_ignored(backend, reduction, teacher, request):
    dev = device_for(backend, request)
    n = 6
    z = (torch.randn(n, V, device=dev) * 3).requires_grad_()
    labels = torch.full((n,), -100, device=dev)
    kw = _teacher(teacher, n, V, 1.0, dev)
    loss, kd, ce = kd_loss(
        z,
        labels,
        **kw,
        reduction=reduction,
        return_components=True,
        backend=backend,
        token_weights=torch.rand(n, device=dev),
    )
    loss.sum().backward()
    for x in (loss, kd, ce):
        assert torch.isfinite(x).all() and (x == 0).all()
    assert torch.isfinite(z.grad).all() and (z.grad == 0).all()


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
def test_zero_token_weights_drop_kd(backend, request):
    """All token weights 0 under "mean": the KD part is 0 (not 0/0) and the loss is β·CE/(α+β)."""
    dev = device_for(backend, request)
    z = torch.randn(N, V, device=dev)
    labels = labels_with_ignored(N, V, device=dev)
    check_kd_loss(
        _fn(backend),
        z,
        labels,
        _teacher("dense", N, V, 1.0, dev),
        dict(token_weights=torch.zeros(N, device=dev)),
        what=f"{backend} w=0",
    )


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
@pytest.mark.parametrize("teacher", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inplace_grad_overwrites_logits(backend, teacher, dtype, request):
    dev = device_for(backend, request)
    z = (torch.randn(N, V, device=dev) * 2).to(dtype)
    labels = labels_with_ignored(N, V, device=dev)
    kw = _teacher(teacher, N, V, 0.5, dev)
    a = z.clone().requires_grad_()
    loss_a = kd_loss(a, labels, **kw, temperature=0.5, backend=backend)
    loss_a.backward()
    leaf = z.clone().requires_grad_()
    b = leaf * 1.0  # a non-leaf logits tensor as the lm_head would produce, safe to overwrite
    loss_b = kd_loss(b, labels, **kw, temperature=0.5, backend=backend, inplace_grad=True)
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(a.grad, leaf.grad)
    assert torch.equal(b.detach(), leaf.grad)  # the logits buffer now holds the gradient


def test_inplace_grad_refuses_saved_logits():
    """If another op saved the logits for its backward, overwriting them must raise, not corrupt."""
    z0 = torch.randn(5, 40, requires_grad=True)
    z = z0.exp()  # exp saves its output for backward
    labels = torch.randint(0, 40, (5,))
    loss = kd_loss(z, labels, alpha=0.0, backend="cpu", inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
def test_no_grad_needed_skips_gradient(backend, request):
    dev = device_for(backend, request)
    z = torch.randn(N, V, device=dev)
    labels = labels_with_ignored(N, V, device=dev)
    kw = _teacher("dense", N, V, 1.0, dev)
    with torch.no_grad():
        a = kd_loss(z, labels, **kw, backend=backend)
    b = kd_loss(z.clone().requires_grad_(), labels, **kw, backend=backend)
    assert float((a - b.detach()).abs()) <= 1e-6 * float(b.detach().abs())
    assert not a.requires_grad


def test_torch_backend_is_the_reference():
    z = torch.randn(7, 50, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (7,))
    t = torch.randn(7, 55, dtype=torch.float64)
    out = kd_loss(z, labels, teacher_logits=t, temperature=0.5, backend="torch")
    assert out.dtype == torch.float64
    # the reference formula, written here once more with F.kl_div / F.cross_entropy
    F = torch.nn.functional
    kl = (
        F.kl_div(F.log_softmax(z / 0.5, -1), F.log_softmax(t[:, :50] / 0.5, -1), log_target=True, reduction="none")
        .sum(-1)
        .mean()
    )
    want = (0.5 * kl + F.cross_entropy(z, labels)) / 1.5
    assert math.isclose(out.item(), want.item(), rel_tol=1e-12)


def test_cpu_path_in_float64():
    z = torch.randn(9, 70, dtype=torch.float64)
    labels = labels_with_ignored(9, 70)
    t = torch.randn(9, 70, dtype=torch.float64)
    check_kd_loss(
        functools.partial(kd_loss, backend="cpu"),
        z,
        labels,
        {"teacher_logits": t},
        dict(temperature=0.5, reduction="sum"),
        what="cpu fp64",
    )


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
def test_sparse_k_equals_vocab(backend, request):
    """k = V: no column is left for the residual bucket; a rounding residual > 0 must not make KD infinite."""
    dev = device_for(backend, request)
    n, vocab = 9, 150
    t = torch.randn(n, vocab, device=dev) * 2
    pl = pseudo_labels(t, vocab, 1.0, vocab)
    pl = pl._replace(residual=torch.full((n,), 3e-7, device=dev))
    z = torch.randn(n, vocab, device=dev)
    labels = labels_with_ignored(n, vocab, device=dev)
    check_kd_loss(_fn(backend), z, labels, {"teacher": pl}, dict(reduction="none"), what=f"{backend} k=V")
    dense = kd_loss(z, labels, teacher_logits=t, reduction="none", return_components=True, backend=backend)[1]
    sparse = kd_loss(z, labels, teacher=pl, reduction="none", return_components=True, backend=backend)[1]
    assert torch.isfinite(sparse).all()
    assert (sparse - dense).abs().max() <= 1e-5 * (1 + dense.abs().max())


@pytest.mark.parametrize("inplace", [False, True])
def test_second_backward_through_same_graph_raises(inplace):
    """The gradient is scaled in place by the first backward; a second one must raise, not double it."""
    z = torch.randn(5, 40, requires_grad=True)
    logits = z * 1.0
    labels = torch.randint(0, 40, (5,))
    loss = kd_loss(logits, labels, alpha=0.0, backend="cpu", inplace_grad=inplace)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
