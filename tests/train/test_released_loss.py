"""The released ClinKD total, (0.5·Σ_valid KL_{T=0.5} + mean_valid CE)/1.5 with no T² (the released
trainer's loss form), written here independently with F.kl_div / F.cross_entropy on full float64 logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clinkd.train.released import released_kd_loss, released_linear_kd_loss, released_loss_reference
from tests.loss.util import QUIET, labels_with_ignored, small_blocks, value_atol  # noqa: F401
from tests.numerics import assert_close

pytestmark = [*QUIET, pytest.mark.usefixtures("small_blocks")]

N, V = 23, 263


def released_formula(z, labels, t, *, kd_only=False):
    """The trainer's formula on aligned labels: KD summed over label positions, CE averaged."""
    keep = labels != -100
    zs, ts, ys = z[keep], t[keep][:, : z.shape[1]], labels[keep]
    kl = F.kl_div(F.log_softmax(zs / 0.5, dim=-1), F.log_softmax(ts / 0.5, dim=-1), log_target=True, reduction="sum")
    if kd_only:
        return kl
    ce = F.cross_entropy(zs, ys)
    return (0.5 * kl + ce) / 1.5


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
@pytest.mark.parametrize("kd_only", [False, True])
def test_released_total(backend, kd_only, request):
    dev = request.getfixturevalue("interpreter") if backend == "triton" else torch.device("cpu")
    z = torch.randn(N, V, device=dev) * 2
    t = torch.randn(N, V + 5, device=dev) * 2
    labels = labels_with_ignored(N, V, device=dev)

    ours_in = z.clone().requires_grad_()
    ours = released_kd_loss(ours_in, labels, teacher_logits=t, kd_only=kd_only, backend=backend)
    ours.backward()
    z64 = z.double().requires_grad_()
    want = released_formula(z64, labels, t.double(), kd_only=kd_only)
    want.backward()
    zb = z.clone().requires_grad_()
    base = released_formula(zb, labels, t, kd_only=kd_only)
    base.backward()
    assert_close("released loss", ours, want, base, atol=value_atol(want, base, torch.float32))
    assert_close("released grad", ours_in.grad, z64.grad, zb.grad)


@pytest.mark.parametrize("backend", ["triton", "cpu", "portable"])
def test_released_linear_matches_logits_form(backend, request):
    """The lm_head-fused preset equals the formula on the full logits hidden·Wᵀ, components included."""
    dev = request.getfixturevalue("interpreter") if backend == "triton" else torch.device("cpu")
    hidden, weight = torch.randn(N, 16, device=dev), torch.randn(V, 16, device=dev) * 0.5
    th, tw = torch.randn(N, 20, device=dev), torch.randn(V + 3, 20, device=dev) * 0.5
    labels = labels_with_ignored(N, V, device=dev)
    h = hidden.clone().requires_grad_()
    loss, kl_sum, ce_mean = released_linear_kd_loss(
        h, weight, labels, teacher_hidden=th, teacher_weight=tw, return_components=True, chunk_size=8, backend=backend
    )
    loss.backward()
    h64 = hidden.double().requires_grad_()
    want = released_formula(h64 @ weight.double().t(), labels, th.double() @ tw.double().t())
    want.backward()
    hb = hidden.clone().requires_grad_()
    base = released_formula(hb @ weight.t(), labels, th @ tw.t())
    base.backward()
    assert_close("released linear loss", loss, want, base, atol=value_atol(want, base, torch.float32))
    assert_close("released linear grad", h.grad, h64.grad, hb.grad)
    keep = labels != -100
    with torch.no_grad():
        z64 = hidden.double() @ weight.double().t()
        t64 = th.double() @ tw.double().t()
        kl64 = released_formula(z64, labels, t64, kd_only=True)
        ce64 = F.cross_entropy(z64[keep], labels[keep])
    assert_close("Σ KL component", kl_sum, kl64, atol=1e-5 * float(kl64.abs()))
    assert_close("mean CE component", ce_mean, ce64, atol=1e-5 * float(ce64.abs()))


def test_released_no_valid_rows_is_zero():
    z = torch.randn(4, 50, requires_grad=True)
    loss = released_kd_loss(z, torch.full((4,), -100), teacher_logits=torch.randn(4, 50), backend="cpu")
    loss.backward()
    assert loss.item() == 0.0 and bool((z.grad == 0).all())


def test_released_with_topk_teacher_close_to_dense_when_k_covers_vocab():
    """With k = V the sparse teacher is the dense one (residual 0): the two presets agree."""
    from tests.loss.util import pseudo_labels

    z = torch.randn(N, V) * 2
    t = torch.randn(N, V) * 2
    labels = labels_with_ignored(N, V)
    dense = released_kd_loss(z, labels, teacher_logits=t, backend="cpu")
    sparse = released_kd_loss(z, labels, teacher=pseudo_labels(t, V, 0.5, V), backend="cpu")
    assert abs(dense.item() - sparse.item()) <= 1e-5 * abs(dense.item())


@pytest.mark.parametrize("kd_only", [False, True])
def test_released_reference_is_the_formula(kd_only):
    """The plain-PyTorch reference (the benchmark's stock loss) equals the formula written here."""
    z, t = torch.randn(N, V, dtype=torch.float64) * 2, torch.randn(N, V + 5, dtype=torch.float64) * 2
    labels = labels_with_ignored(N, V)
    want = released_formula(z, labels, t, kd_only=kd_only)
    torch.testing.assert_close(released_loss_reference(z, t, labels, kd_only=kd_only), want, rtol=1e-12, atol=1e-12)
