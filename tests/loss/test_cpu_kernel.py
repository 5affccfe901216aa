"""The C++ row kernel of the "cpu" backend (csrc/loss/kd_rows_cpu.cpp) on its own: against the float64
reference at awkward vocabulary sizes (one column, block edges), the gradient written over the logits
equal to the one written elsewhere, rows with +inf/NaN logits, thread counts, and the checks it repeats
in C++ for callers that bypass the Python ones."""

from __future__ import annotations

import pytest
import torch

from clinkd_kernels.loss import kd_loss
from clinkd_kernels.loss.cpu import kd_rows_cpu
from clinkd_kernels.loss.rows import rows_function
from tests.loss.util import check_kd_loss, labels_with_ignored, pseudo_labels


def _teacher(kind, n, vocab, temperature):
    t = torch.randn(n, vocab + 3) * 3
    if kind == "dense":
        return {"teacher_logits": t}
    if kind == "sparse":
        return {"teacher": pseudo_labels(t, min(vocab, 5), temperature, vocab)}
    return {}


@pytest.mark.parametrize("vocab", [1, 2, 1023, 1024, 1025, 3001])
@pytest.mark.parametrize("teacher", ["dense", "sparse"])
def test_awkward_vocabulary_sizes(vocab, teacher):
    n = 9
    z = torch.randn(n, vocab) * 2
    labels = labels_with_ignored(n, vocab)
    opts = dict(temperature=0.7, alpha=0.6, beta=0.5, reduction="none", token_weights=torch.rand(n))
    check_kd_loss(
        lambda *a, **k: kd_loss(*a, backend="cpu", **k),
        z,
        labels,
        _teacher(teacher, n, vocab, 0.7),
        opts,
        what=f"cpu V={vocab} {teacher}",
    )


def _rows(z, labels, *, teacher, inv_t, grad_out):
    n = z.shape[0]
    kd, ce = torch.empty(n), torch.empty(n)
    coef_kd, coef_ce = torch.rand(n), torch.rand(n)
    tl = teacher.get("teacher_logits")
    pl = teacher.get("teacher")
    topk = None if pl is None else (pl.indices, pl.logprobs, pl.residual)
    kd_rows_cpu(
        z,
        labels,
        teacher_logits=tl,
        topk=topk,
        inv_t=inv_t,
        ignore_index=-100,
        coef_kd=coef_kd,
        coef_ce=coef_ce,
        kd_out=kd,
        ce_out=ce,
        grad_out=grad_out,
    )
    return kd, ce, coef_kd, coef_ce


@pytest.mark.parametrize("teacher", ["dense", "sparse", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_over_the_logits_equals_the_gradient_elsewhere(teacher, dtype):
    """grad_out may be z itself: every z[i] is read before its gradient is written, the top-k columns too."""
    n, vocab = 7, 700
    z = (torch.randn(n, vocab) * 2).to(dtype)
    labels = labels_with_ignored(n, vocab)
    t = _teacher(teacher, n, vocab, 0.5)
    torch.manual_seed(0)
    out = torch.empty_like(z)
    want = _rows(z, labels, teacher=t, inv_t=2.0, grad_out=out)
    torch.manual_seed(0)
    z_inplace = z.clone()
    got = _rows(z_inplace, labels, teacher=t, inv_t=2.0, grad_out=z_inplace)
    assert torch.equal(z_inplace, out)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_undefined_student_softmax_gives_nan_as_the_portable_path():
    """The row kernels themselves (past kd_loss, which refuses such rows by name) agree on rows whose
    softmax is undefined: NaN on both."""
    n, vocab = 4, 50
    z = torch.randn(n, vocab)
    z[0, 3] = float("inf")
    z[1, 7] = float("nan")
    z[2] = float("-inf")
    labels = torch.tensor([1, 2, 3, 4])
    teacher = torch.randn(n, vocab)
    outs = {}
    for backend in ("cpu", "portable"):
        kd, ce = torch.empty(n), torch.empty(n)
        ones = torch.ones(n)
        rows_function(backend)(
            z, labels, teacher_logits=teacher, inv_t=0.5, ignore_index=-100, coef_kd=ones, coef_ce=ones,
            kd_out=kd, ce_out=ce, grad_out=None,
        )  # fmt: skip
        outs[backend] = kd
    assert torch.equal(torch.isnan(outs["cpu"]), torch.isnan(outs["portable"]))
    assert torch.isnan(outs["cpu"][:3]).all() and torch.isfinite(outs["cpu"][3])
    with pytest.raises(ValueError, match=r"student_logits rows with a label .*rows 0, 1, 2 do not"):
        kd_loss(z, labels, teacher_logits=teacher, temperature=2.0, reduction="none", backend="cpu")


def test_rows_are_the_same_on_any_number_of_threads():
    z, labels = torch.randn(33, 2000) * 3, labels_with_ignored(33, 2000)
    t = _teacher("sparse", 33, 2000, 1.0)
    threads = torch.get_num_threads()
    results = []
    for count in (1, max(2, threads)):
        torch.set_num_threads(count)
        try:
            out = torch.empty_like(z)
            torch.manual_seed(0)
            results.append((*_rows(z, labels, teacher=t, inv_t=1.0, grad_out=out), out))
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _ext(**overrides):
    n, vocab = 3, 10
    args = dict(
        z=torch.randn(n, vocab),
        labels=torch.tensor([0, 1, 2]),
        teacher_logits=None,
        topk_indices=None,
        topk_logprobs=None,
        topk_residual=None,
        inv_temperature=1.0,
        ignore_index=-100,
        coef_kd=torch.ones(n),
        coef_ce=torch.ones(n),
        kd_out=torch.empty(n),
        ce_out=torch.empty(n),
        grad_out=None,
    )
    args.update(overrides)
    torch.ops.clinkd.kd_rows_ext(*args.values())


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(z=torch.randn(3, 10, 2)), "z must be 2-D"),
        (dict(z=torch.randn(10, 3).t()), "z must have unit stride"),
        (dict(z=torch.zeros(3, 10, dtype=torch.long)), "z must be a floating tensor"),
        (dict(labels=torch.tensor([0, 1])), r"labels must have shape \[3\]"),
        (dict(labels=torch.tensor([0.0, 1.0, 2.0])), "labels must be int64 or int32"),
        (dict(labels=torch.tensor([0, 10, 2])), r"labels\[1\] = 10 is outside \[0, 10\)"),
        (dict(labels=torch.tensor([0, -5, 2])), r"labels\[1\] = -5 is outside"),
        (dict(coef_kd=torch.ones(3, dtype=torch.float16)), "coefficients and outputs must be float32 or float64"),
        (dict(kd_out=torch.empty(4)), r"kd_out must have shape \[3\]"),
        (dict(teacher_logits=torch.randn(3, 9)), r"teacher_logits must have shape \[3, >= 10\]"),
        (dict(topk_indices=torch.zeros(3, 2, dtype=torch.long)), "need indices, logprobs and residual together"),
        (
            dict(
                topk_indices=torch.tensor([[0, 10]] * 3), topk_logprobs=torch.zeros(3, 2), topk_residual=torch.zeros(3)
            ),
            r"teacher.indices\[\d, 1\] = 10 is outside \[0, 10\)",
        ),  # any row: they run in parallel
        (
            dict(
                topk_indices=torch.zeros(3, 2, dtype=torch.long),
                topk_logprobs=torch.zeros(3, 3),
                topk_residual=torch.zeros(3),
            ),
            "topk_logprobs must have the shape of topk_indices",
        ),
        (dict(grad_out=torch.empty(3, 11)), "grad_out must have the shape of z"),
        (dict(inv_temperature=0.0), "inv_temperature must be finite and > 0"),
        (dict(inv_temperature=float("inf")), "inv_temperature must be finite and > 0"),
    ],
)
def test_the_kernel_refuses_bad_arguments_itself(overrides, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        _ext(**overrides)
