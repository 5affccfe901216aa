"""bf16 on a GPU (the interpreter cannot run bf16 dots, and the real kernel's numerics are checked here)."""

from __future__ import annotations

import functools

import pytest
import torch

from clinkd_kernels.loss import kd_loss, linear_kd_loss
from tests.loss.util import check_kd_loss, check_linear, labels_with_ignored, pseudo_labels

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("teacher", ["dense", "sparse"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("vocab", [4099, 32011])  # one and several 2048-wide tiles, ragged tails
def test_kd_loss_bf16(teacher, reduction, vocab):
    n = 67
    z = (torch.randn(n, vocab, device="cuda") * 2).bfloat16()
    t = torch.randn(n, vocab + 13, device="cuda") * 2
    labels = labels_with_ignored(n, vocab, device="cuda")
    kw = {"teacher_logits": t.bfloat16()} if teacher == "dense" else {"teacher": pseudo_labels(t, 64, 0.5, vocab)}
    check_kd_loss(
        functools.partial(kd_loss, backend="triton"),
        z,
        labels,
        kw,
        dict(temperature=0.5, reduction=reduction, token_weights=torch.rand(n, device="cuda")),
        what=f"bf16 {teacher} {reduction}",
    )


@pytest.mark.parametrize("teacher", ["dense", "sparse"])
def test_linear_kd_loss_bf16(teacher):
    """Several chunks; grad_W accumulates bf16 products into fp32 (addmm with out_dtype)."""
    n, hd, vocab, hd_t = 300, 64, 5003, 96
    inputs = {
        "hidden": torch.randn(n, hd, device="cuda").bfloat16(),
        "weight": (torch.randn(vocab, hd, device="cuda") * 0.2).bfloat16(),
        "bias": (torch.randn(vocab, device="cuda") * 0.2).bfloat16(),
    }
    th = torch.randn(n, hd_t, device="cuda").bfloat16()
    tw = (torch.randn(vocab + 7, hd_t, device="cuda") * 0.2).bfloat16()
    kw = (
        {"teacher_hidden": th, "teacher_weight": tw}
        if teacher == "dense"
        else {"teacher": pseudo_labels(th.float() @ tw.float().t(), 32, 1.0, vocab)}
    )
    labels = labels_with_ignored(n, vocab, device="cuda")
    check_linear(
        functools.partial(linear_kd_loss, backend="triton"),
        inputs,
        labels,
        kw,
        dict(temperature=1.0, chunk_size=128),
        what=f"bf16 linear {teacher}",
    )


def test_inplace_grad_bf16():
    n, vocab = 33, 9001
    z = torch.randn(n, vocab, device="cuda").bfloat16()
    t = torch.randn(n, vocab, device="cuda").bfloat16()
    labels = labels_with_ignored(n, vocab, device="cuda")
    a = z.clone().requires_grad_()
    kd_loss(a, labels, teacher_logits=t).backward()
    leaf = z.clone().requires_grad_()
    b = leaf * 1.0
    kd_loss(b, labels, teacher_logits=t, inplace_grad=True).backward()
    assert torch.equal(a.grad, leaf.grad)
