"""Bad input is refused with a ValueError/TypeError naming the argument (never a crash or a wrong answer)."""

from __future__ import annotations

import re

import pytest
import torch

from clinkd_kernels import PseudoLabels
from clinkd_kernels.loss import kd_loss, linear_kd_loss
from tests.loss.util import pseudo_labels

N, V, HD = 6, 40, 8


def _logits():
    return torch.randn(N, V), torch.randint(0, V, (N,)), torch.randn(N, V + 2)


def _pl(k=4, n=N, vocab=V):
    return pseudo_labels(torch.randn(n, vocab), k, 1.0, vocab)


def _bad_rows(kind: str, n=N, v=V, rows=(1, 4)) -> torch.Tensor:
    """Fresh student logits whose ``rows`` have no distribution: a NaN, a +inf, or every entry −inf."""
    z = torch.randn(n, v)
    for r in rows:
        if kind == "all -inf":
            z[r] = float("-inf")
        else:
            z[r, torch.randint(0, v, ()).item()] = float(kind)
    return z


def _call(**over):
    z, labels, t = _logits()
    args = dict(student_logits=z, labels=labels, teacher_logits=t, backend="cpu")
    args.update(over)
    z = args.pop("student_logits")
    labels = args.pop("labels")
    return kd_loss(z, labels, **args)


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(student_logits=torch.randn(N, V, 2)), ValueError, "student_logits must be 2-D"),
        (dict(student_logits=torch.randint(0, 3, (N, V))), TypeError, "student_logits must have dtype"),
        (dict(student_logits=torch.randn(N, 0)), ValueError, "student_logits must have at least one column"),
        (dict(labels=torch.randint(0, V, (N + 1,))), ValueError, r"labels must have shape \[6\]"),
        (dict(labels=torch.rand(N)), TypeError, "labels must have dtype"),
        (dict(labels=torch.tensor([0, 1, V, 2, 3, 4])), ValueError, r"labels must be in \[0, 40\).*rows 2"),
        (dict(labels=torch.tensor([0, 1, -5, 2, 3, 4])), ValueError, r"labels must be in \[0, 40\)"),
        (
            dict(teacher_logits=torch.randn(N, V - 1)),
            ValueError,
            "teacher_logits must have at least the student's V=40",
        ),
        (dict(teacher_logits=torch.randn(N + 1, V)), ValueError, r"teacher_logits must have shape \[6, \*\]"),
        (dict(teacher_logits=torch.randint(0, 2, (N, V))), TypeError, "teacher_logits must have dtype"),
        (dict(teacher_logits=None), ValueError, "alpha > 0 needs a teacher"),
        (dict(teacher=_pl()), ValueError, "either a dense teacher or `teacher`"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(alpha=-0.1), ValueError, "alpha must be a finite number >= 0"),
        (dict(beta=-1.0), ValueError, "beta must be a finite number >= 0"),
        (dict(alpha=0.0, beta=0.0), ValueError, "alpha and beta must not both be 0"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (dict(token_weights=torch.rand(N + 2)), ValueError, r"token_weights must have shape \[6\]"),
        (
            dict(token_weights=torch.tensor([1.0, -0.5, 1, 1, 1, 1])),
            ValueError,
            "token_weights must be finite and >= 0.*rows 1",
        ),
        (dict(token_weights=torch.tensor([1.0, float("inf"), 1, 1, 1, 1])), ValueError, "token_weights must be finite"),
        (dict(backend="cuda"), ValueError, "kd_loss has no 'cuda' backend"),
        (dict(backend="bogus"), ValueError, "is not a backend"),
        (dict(student_logits=_bad_rows("nan")), ValueError, r"student_logits rows with a label .*rows 1, 4 do not"),
        (dict(student_logits=_bad_rows("inf")), ValueError, r"student_logits rows with a label .*rows 1, 4 do not"),
        (dict(student_logits=_bad_rows("all -inf")), ValueError, r"student_logits rows with a label .*rows 1, 4 "),
    ],
)
def test_kd_loss_refuses(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def _sparse(**fields):
    pl = _pl()
    return pl._replace(**fields)


@pytest.mark.parametrize(
    "teacher, exc, match",
    [
        ((1, 2, 3), TypeError, "teacher must be a PseudoLabels"),
        (
            _sparse(indices=torch.randint(0, V, (N + 1, 4), dtype=torch.int32)),
            ValueError,
            r"teacher.indices must have shape \[6, \*\]",
        ),
        (_sparse(indices=torch.randint(0, V, (N, 4)).float()), TypeError, "teacher.indices must have dtype"),
        (_sparse(logprobs=torch.randn(N, 5)), ValueError, r"teacher.logprobs must have shape \[6, 4\]"),
        (_sparse(residual=torch.rand(N, 1)), ValueError, "teacher.residual must be 1-D"),
        (
            _sparse(indices=torch.tensor([[0, 1, 2, V]] * N, dtype=torch.int32)),
            ValueError,
            r"teacher.indices must be in \[0, 40\)",
        ),
        (
            _sparse(indices=torch.tensor([[0, 1, 2, -1]] * N, dtype=torch.int32)),
            ValueError,
            r"teacher.indices must be in \[0, 40\)",
        ),
        (_sparse(indices=torch.tensor([[0, 1, 1, 2]] * N, dtype=torch.int32)), ValueError, "must not repeat a token"),
        (_sparse(logprobs=torch.full((N, 4), 0.5)), ValueError, "teacher.logprobs must be log-probabilities"),
        (_sparse(logprobs=torch.full((N, 4), float("nan"))), ValueError, "teacher.logprobs must be log-probabilities"),
        (_sparse(residual=torch.full((N,), 1.5)), ValueError, r"teacher.residual must be in \[0, 1\]"),
        (_sparse(residual=torch.full((N,), -0.2)), ValueError, r"teacher.residual must be in \[0, 1\]"),
        (_pl(k=V + 1, vocab=V + 1), ValueError, r"teacher.indices must have k in \[1, 40\]"),
    ],
)
def test_pseudo_labels_refused(teacher, exc, match):
    with pytest.raises(exc, match=match):
        _call(teacher_logits=None, teacher=teacher)


def test_pseudo_labels_refused_on_triton_backend_too(interpreter):
    z = torch.randn(N, V, device=interpreter)
    pl = _sparse(indices=torch.tensor([[0, 1, 2, V + 3]] * N, dtype=torch.int32)).to(interpreter)
    with pytest.raises(ValueError, match=r"teacher.indices must be in \[0, 40\)"):
        kd_loss(z, torch.randint(0, V, (N,), device=interpreter), teacher=pl, backend="triton")


def test_float64_refused_on_triton(interpreter):
    z = torch.randn(N, V, dtype=torch.float64, device=interpreter)
    with pytest.raises(TypeError, match="fp32/fp16/bf16 for the triton backend"):
        kd_loss(z, torch.randint(0, V, (N,), device=interpreter), alpha=0.0, backend="triton")


def test_inplace_grad_needs_contiguous():
    z = torch.randn(V, N).t().requires_grad_()
    with pytest.raises(ValueError, match="inplace_grad needs contiguous"):
        kd_loss(z, torch.randint(0, V, (N,)), alpha=0.0, inplace_grad=True, backend="cpu")


def _lin(**over):
    args = dict(
        hidden=torch.randn(N, HD),
        weight=torch.randn(V, HD),
        labels=torch.randint(0, V, (N,)),
        teacher_hidden=torch.randn(N, HD + 3),
        teacher_weight=torch.randn(V + 5, HD + 3),
        backend="cpu",
    )
    args.update(over)
    return linear_kd_loss(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(hidden=torch.randn(N)), ValueError, "hidden must be 2-D"),
        (dict(weight=torch.randn(V, HD + 1)), ValueError, r"weight must have shape \[\*, 8\]"),
        (dict(weight=torch.randn(V, HD, dtype=torch.float64)), TypeError, "weight must have the dtype of hidden"),
        (dict(weight=torch.randn(0, HD)), ValueError, "weight must have at least one row"),
        (dict(bias=torch.randn(V + 1)), ValueError, r"bias must have shape \[40\]"),
        (dict(bias=torch.randn(V).half()), TypeError, "bias must have the dtype of hidden"),
        (dict(labels=torch.randint(0, V, (N - 1,))), ValueError, r"labels must have shape \[6\]"),
        (dict(labels=torch.tensor([0, 1, 2, 3, 4, V + 9])), ValueError, r"labels must be in \[0, 40\).*rows 5"),
        (dict(teacher_hidden=torch.randn(N + 1, HD + 3)), ValueError, r"teacher_hidden must have shape \[6, \*\]"),
        (dict(teacher_weight=torch.randn(V + 5, HD)), ValueError, r"teacher_weight must have shape \[\*, 11\]"),
        (
            dict(teacher_weight=torch.randn(V - 1, HD + 3)),
            ValueError,
            "teacher_weight must have at least the student's V=40",
        ),
        (
            dict(teacher_weight=torch.randn(V, HD + 3).half()),
            TypeError,
            "teacher_weight must have the dtype of teacher_hidden",
        ),
        (dict(teacher_bias=torch.randn(V)), ValueError, r"teacher_bias must have shape \[45\]"),
        (dict(teacher_weight=None), ValueError, "needs both teacher_hidden and teacher_weight"),
        (dict(teacher_hidden=None, teacher_weight=None), ValueError, "alpha > 0 needs a teacher"),
        (dict(teacher=_pl()), ValueError, "either a dense teacher or `teacher`"),
        (
            dict(
                teacher_hidden=None,
                teacher_weight=None,
                teacher=_pl(vocab=V + 9, k=3)._replace(indices=torch.tensor([[0, 1, V + 2]] * N, dtype=torch.int32)),
            ),
            ValueError,
            r"teacher.indices must be in \[0, 40\)",
        ),
        (dict(chunk_size=0), ValueError, r"chunk_size must be in \[1, inf\]"),
        (dict(chunk_size=2.5), TypeError, "chunk_size must be an int"),
        (dict(temperature=0), ValueError, "temperature"),
        (dict(alpha=0.0, beta=0.0), ValueError, "alpha and beta must not both be 0"),
        (dict(token_weights=-torch.rand(N)), ValueError, "token_weights must be finite and >= 0"),
        (dict(token_weights=torch.rand(N, 1)), ValueError, "token_weights must be 1-D"),
    ],
)
def test_linear_kd_loss_refuses(over, exc, match):
    with pytest.raises(exc, match=match):
        _lin(**over)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_device_mismatch_refused():
    with pytest.raises(ValueError, match="labels is on cpu but student_logits is on cuda"):
        kd_loss(torch.randn(N, V, device="cuda"), torch.randint(0, V, (N,)), alpha=0.0)
    with pytest.raises(ValueError, match="weight is on"):
        _lin(weight=torch.randn(V, HD, device="cuda"))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: kd_loss(torch.randn(N, V, device="meta"), torch.randint(0, V, (N,)), alpha=0.0), "student_logits"),
        (lambda: kd_loss(torch.randn(N, V), torch.randint(0, V, (N,), device="meta"), alpha=0.0), "labels"),
        (
            lambda: kd_loss(
                torch.randn(N, V), torch.randint(0, V, (N,)), teacher_logits=torch.randn(N, V, device="meta")
            ),
            "teacher_logits",
        ),
        (lambda: _lin(weight=torch.randn(V, HD, device="meta")), "weight"),
        (lambda: _lin(teacher_weight=torch.randn(V + 5, HD + 3, device="meta")), "teacher_weight"),
    ],
)
def test_meta_tensors_refused(call, name):
    """Before: "labels is on cpu but student_logits is on meta" and the like, or a kernel's error. A
    meta-device tensor has no data: refused by name before any work (docs/api.md)."""
    with pytest.raises(ValueError, match=rf"^{name} is on the meta device, which holds no data"):
        call()


@pytest.mark.parametrize("kind", ["nan", "inf", "all -inf"])
@pytest.mark.parametrize("backend", ["cpu", "portable", "torch", "triton"])
def test_student_rows_without_a_distribution(kind, backend, request):
    """Labelled student rows with NaN, +inf, or only −inf are refused by row on every backend, with a
    sparse teacher and per-row reduction too; their ignored twins are not (the loss is finite)."""
    device = request.getfixturevalue("interpreter") if backend == "triton" else torch.device("cpu")
    z, y = _bad_rows(kind).to(device), torch.randint(0, V, (N,), device=device)
    pl = PseudoLabels(*(x.to(device) for x in _pl()))
    with pytest.raises(ValueError, match=r"^student_logits rows with a label .*rows 1, 4 do not"):
        kd_loss(z, y, teacher=pl, reduction="none", backend=backend)
    y[[1, 4]] = -100
    assert torch.isfinite(kd_loss(z, y, teacher=pl, reduction="none", backend=backend)).all()


@pytest.mark.parametrize("where", ["hidden", "weight", "bias"])
@pytest.mark.parametrize("backend", ["cpu", "portable", "torch", "triton"])
def test_linear_student_rows_without_a_distribution(where, backend, request):
    """linear_kd_loss: a +inf in hidden (one row), a NaN in weight or bias (every row) leaves the student
    logits hidden @ weight.T + bias without a distribution: refused by row on every backend."""
    device = request.getfixturevalue("interpreter") if backend == "triton" else torch.device("cpu")
    h, w, b = torch.randn(N, HD), torch.randn(V, HD), torch.randn(V)
    w[0, 0] = 1.0  # so that +inf in h[2, 0] makes a +inf logit (−inf ones alone would be a masked vocabulary)
    {"hidden": h[2], "weight": w[7], "bias": b[7:8]}[where][0] = float("inf") if where == "hidden" else float("nan")
    rows = "2" if where == "hidden" else "0, 1, 2, 3, 4 (and 1 more)"
    y = torch.randint(0, V, (N,))
    with pytest.raises(ValueError, match=rf"student logits hidden @ weight.T .*rows {re.escape(rows)} do not"):
        linear_kd_loss(*(x.to(device) for x in (h, w, y)), bias=b.to(device), alpha=0.0, chunk_size=4, backend=backend)


def test_backend_forced_cpu_on_meta_refused():
    """All on the meta device: refused by the first argument's name before the backend is chosen."""
    with pytest.raises(ValueError, match="^student_logits is on the meta device"):
        kd_loss(torch.randn(N, V, device="meta"), torch.randint(0, V, (N,), device="meta"), alpha=0.0, backend="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_backend_forced_cpu_on_cuda_refused():
    with pytest.raises(RuntimeError, match="CPU kernel needs CPU tensors"):
        kd_loss(torch.randn(N, V, device="cuda"), torch.randint(0, V, (N,), device="cuda"), alpha=0.0, backend="cpu")
