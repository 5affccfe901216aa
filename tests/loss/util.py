"""Input builders and reference comparisons shared by the loss tests."""

from __future__ import annotations

import pytest
import torch

from clinkd_kernels.loss.reference import kd_loss_reference, linear_kd_loss_reference
from clinkd_kernels.topk import PseudoLabels
from tests.numerics import DEFAULT_ATOL, NORM_TOL, assert_close


def device_for(backend: str, request) -> torch.device:
    """The device a backend's test runs on: the Triton interpreter's (fixture ``interpreter``) or the CPU."""
    return request.getfixturevalue("interpreter") if backend == "triton" else torch.device("cpu")


def value_atol(ref: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> float:
    """atol for loss values (scalars or one value per row).

    Per-row losses are sums over the vocabulary whose rounding error in the baseline is a random
    quantity per row, sometimes ~0 by luck; as flash-attention's tests do, the allowance uses the
    baseline's largest error over the tensor (2·max|base − ref|) besides the elementwise term. Plus
    two fp32 ulps of the largest |value|: the outputs are fp32 numbers of O(10..100) here, where the
    fixed 1e-6 is below one ulp. The relative-norm bound of the rule still applies unchanged.
    """
    finite = torch.isfinite(ref) & torch.isfinite(base)
    r, b = ref.detach().double()[finite], base.detach().double()[finite]
    scale = float(r.abs().max()) if r.numel() else 0.0
    base_err = float((b - r).abs().max()) if r.numel() else 0.0
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return DEFAULT_ATOL[dtype] + 2 * base_err + 2 * eps * scale


def norm_tol(ref: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> float:
    """The rule's relative-norm bound for ``dtype``, or twice the baseline's own relative error where
    that is larger: some values here are ill-conditioned in fp32 (e.g. KD near 0 from a two-bucket
    top-1 teacher), and plain torch in that dtype misses the fixed bound by the same margin."""
    finite = torch.isfinite(ref) & torch.isfinite(base)
    r, b = ref.detach().double()[finite], base.detach().double()[finite]
    rn = float(r.norm())
    base_rel = float((b - r).norm()) / rn if rn > 0 else 0.0
    return max(NORM_TOL.get(dtype, 1e-5), 2 * base_rel)


# numpy warns about −inf − −inf and log(0) = −inf, both intended (masked lanes, empty sums), interpreter only
QUIET = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]


@pytest.fixture
def small_blocks(monkeypatch):
    """Vocabulary tiles of 128 columns, so V = 301 spans three tiles with a ragged last one; the PyTorch
    row path works through 7 rows at a time at V = 301 (ragged last block too)."""
    import clinkd_kernels.loss.launch as launch
    import clinkd_kernels.loss.portable as cpu

    monkeypatch.setattr(launch, "MAX_BLOCK_V", 128)
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 7 * 8 * 301)


def pseudo_labels(teacher_logits: torch.Tensor, k: int, temperature: float, vocab: int) -> PseudoLabels:
    """Top-k pseudo-labels of a dense teacher with plain torch (float64 math, stored as the extractor does)."""
    logp = torch.log_softmax(teacher_logits[:, :vocab].double() / temperature, dim=-1)
    top, idx = logp.topk(k, dim=-1)
    p = top.exp()
    margin = p[:, 0] - (p[:, 1] if k > 1 else 0.0)
    residual = (1 - p.sum(-1)).clamp(min=0)
    lse = torch.logsumexp(teacher_logits[:, :vocab].double() / temperature, dim=-1)
    return PseudoLabels(idx.int(), top.float(), lse.float(), margin.float(), residual.float())


def labels_with_ignored(
    n: int, vocab: int, *, ignore_index: int = -100, n_ignored: int | None = None, device=None
) -> torch.Tensor:
    labels = torch.randint(0, vocab, (n,), device=device)
    n_ignored = max(1, n // 5) if n_ignored is None else n_ignored
    labels[torch.randperm(n, device=device)[:n_ignored]] = ignore_index
    return labels


def cast_teacher(kw: dict, dtype=None, device=None) -> dict:
    """The teacher keyword arguments with dense teacher logits cast (PseudoLabels stay as extracted)."""
    out = dict(kw)
    if out.get("teacher_logits") is not None:
        out["teacher_logits"] = out["teacher_logits"].to(dtype=dtype or out["teacher_logits"].dtype, device=device)
    if out.get("teacher") is not None and device is not None:
        out["teacher"] = out["teacher"].to(device)
    return out


def kd_magnitude(log_q: torch.Tensor, labels: torch.Tensor, teacher_kw: dict, opts: dict) -> float:
    """||H(p, q)|| reduced like the KD part, in float64: the scale of KD's rounding error.

    KD = Σ p log p − Σ p log q is a difference of two sums of size ~H(p, q) (≈ log V for a flat teacher),
    so its fp32 error is absolute on that scale, not relative to KD, which can sit near 0. Used as the
    norm floor of the KD comparison. log_q [N, V] float64 = log softmax(z / T).
    """
    T = opts.get("temperature", 1.0)
    with torch.no_grad():
        t = teacher_kw.get("teacher_logits")
        if t is not None:
            p = torch.softmax(t[:, : log_q.shape[1]].double() / T, dim=-1)
            rows = torch.where(p > 0, -p * log_q, torch.zeros_like(p)).sum(-1)
        elif teacher_kw.get("teacher") is not None:
            pl = teacher_kw["teacher"]
            idx = pl.indices.long()
            rows = -(pl.logprobs.double().exp() * log_q.gather(1, idx)).sum(-1)
            in_top = torch.zeros_like(log_q, dtype=torch.bool).scatter_(1, idx, True)
            rest = torch.logsumexp(log_q.masked_fill(in_top, float("-inf")), dim=-1)
            r = pl.residual.double()
            rows = rows - torch.where(r > 0, r * rest, torch.zeros_like(r))
        else:
            return 0.0
        valid = labels != opts.get("ignore_index", -100)
        w = opts.get("token_weights")
        w = torch.ones_like(rows) if w is None else w.double().abs()
        rows = torch.where(valid & torch.isfinite(rows), w * rows, torch.zeros_like(rows))
        rows = rows * (T**2 if opts.get("t2_scale") else 1.0)
        reduction = opts.get("reduction", "mean")
        if reduction == "sum":
            rows = rows.sum()
        elif reduction == "mean":
            rows = rows.sum() / max(float(torch.where(valid, w, torch.zeros_like(w)).sum()), 1e-300)
        return float(rows.norm())


def check_kd_loss(
    fn,
    z: torch.Tensor,
    labels: torch.Tensor,
    teacher_kw: dict,
    opts: dict,
    *,
    what: str = "",
    loss_atol: float | None = None,
):
    """Compare ``fn(z, labels, **teacher_kw, **opts)`` (loss, kd, ce and ∂/∂z) with the float64 reference,
    using the plain-torch result in z's dtype as the baseline (tests/numerics rule)."""
    z_ours = z.detach().clone().requires_grad_()
    loss, kd, ce = fn(z_ours, labels, return_components=True, **teacher_kw, **opts)
    grad_out = torch.rand_like(loss) + 0.5 if loss.dim() else None  # per-row grad_output for "none"
    loss.backward(grad_out)

    z64 = z.detach().double().requires_grad_()
    ref = kd_loss_reference(
        z64,
        labels,
        return_components=True,
        **cast_teacher(teacher_kw, torch.float64 if teacher_kw.get("teacher_logits") is not None else None),
        **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()},
    )
    ref[0].backward(None if grad_out is None else grad_out.double())

    zb = z.detach().clone().requires_grad_()
    base = kd_loss_reference(zb, labels, return_components=True, compute_dtype=z.dtype, **teacher_kw, **opts)
    base[0].backward(None if grad_out is None else grad_out.to(base[0].dtype))

    T = opts.get("temperature", 1.0)
    kd_floor = kd_magnitude(
        torch.log_softmax(z64.detach() / T, dim=-1), labels, cast_teacher(teacher_kw, torch.float64), opts
    )
    alpha, beta = opts.get("alpha", 0.5), opts.get("beta", 1.0)
    floors = {"loss": kd_floor * abs(alpha / (alpha + beta)), "kd": kd_floor, "ce": 0.0}
    for name, o, r, b in zip(("loss", "kd", "ce"), (loss, kd, ce), ref, base):
        atol = value_atol(r, b, z.dtype) if loss_atol is None else loss_atol
        assert_close(
            f"{what} {name}",
            o,
            r,
            b,
            atol=atol,
            dtype=z.dtype,
            norm_tol=norm_tol(r, b, z.dtype),
            norm_floor=floors[name],
        )
    assert_close(f"{what} grad", z_ours.grad, z64.grad, zb.grad, norm_tol=norm_tol(z64.grad, zb.grad, z.dtype))
    return loss


def _logit_rounding_bound(r64: dict, t64: dict, dtype, labels, opts) -> tuple[float, float, float]:
    """First-order bound on how much (loss, kd, ce) move when the lm_head logits are rounded to ``dtype``.

    In fp16/bf16 the logits are materialised in that dtype by design (ours per chunk, torch's for the
    batch), each off by up to half an ulp, independently in the two; a scalar loss then carries a random
    error of that order which a single baseline sample may happen to miss. Per row,
    Σ_v |∂CE/∂z_v| ≤ 2, Σ_v |∂KD/∂z_v| ≤ 2/T and Σ_v |∂KD/∂t_v| ≤ 2/T. 0 for fp32/fp64.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return 0.0, 0.0, 0.0
    rel = 0.5 * torch.finfo(dtype).eps  # rounding to dtype moves x by at most half an ulp ≤ rel·|x|
    with torch.no_grad():
        z = r64["hidden"] @ r64["weight"].t()
        dz = rel * float(z.abs().max())
        dt = 0.0
        if t64.get("teacher_hidden") is not None:
            dt = rel * float((t64["teacher_hidden"] @ t64["teacher_weight"].t()).abs().max())
    T = opts.get("temperature", 1.0)
    alpha, beta = opts.get("alpha", 0.5), opts.get("beta", 1.0)
    kd = 2 / T * (dz + dt) * (T**2 if opts.get("t2_scale") else 1.0)
    ce = 2 * dz
    if opts.get("reduction", "mean") == "sum":
        n_valid = int((labels != opts.get("ignore_index", -100)).sum())
        w = opts.get("token_weights")
        kd *= n_valid * (1.0 if w is None else float(w.max()))
        ce *= n_valid
    return (alpha * kd + beta * ce) / (alpha + beta), kd, ce


def check_linear(
    fn, inputs: dict, labels, teacher_kw: dict, opts: dict, *, what: str = "", loss_atol: float | None = None
):
    """Same for the lm_head-fused form: loss parts and gradients of hidden, weight and bias."""
    names = [k for k in ("hidden", "weight", "bias") if inputs.get(k) is not None]
    ours = {k: inputs[k].detach().clone().requires_grad_() for k in names}
    loss, kd, ce = fn(
        ours["hidden"], ours["weight"], labels, bias=ours.get("bias"), return_components=True, **teacher_kw, **opts
    )
    grad_out = torch.rand_like(loss) + 0.5 if loss.dim() else None
    loss.backward(grad_out)

    ref_opts = {k: v for k, v in opts.items() if k != "chunk_size"}  # the reference has no chunks
    r64 = {k: inputs[k].detach().double().requires_grad_() for k in names}
    t64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in teacher_kw.items()}
    ref = linear_kd_loss_reference(
        r64["hidden"],
        r64["weight"],
        labels,
        bias=r64.get("bias"),
        return_components=True,
        **t64,
        **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in ref_opts.items()},
    )
    ref[0].backward(None if grad_out is None else grad_out.double())

    dtype = inputs["hidden"].dtype
    rounding = _logit_rounding_bound(r64, t64, dtype, labels, ref_opts)
    rb = {k: inputs[k].detach().clone().requires_grad_() for k in names}
    base = linear_kd_loss_reference(
        rb["hidden"],
        rb["weight"],
        labels,
        bias=rb.get("bias"),
        return_components=True,
        compute_dtype=dtype,
        **teacher_kw,
        **ref_opts,
    )
    base[0].backward(None if grad_out is None else grad_out.to(base[0].dtype))

    for name, o, r, b, bound in zip(("loss", "kd", "ce"), (loss, kd, ce), ref, base, rounding):
        atol = value_atol(r, b, dtype) + bound if loss_atol is None else loss_atol
        assert_close(f"{what} {name}", o, r, b, atol=atol, dtype=dtype, norm_tol=norm_tol(r, b, dtype))
    # grad_W and grad_b add one fp32 rounding per chunk (the accumulator), where torch's single matmul
    # rounds once: allow eps32·max|ref| per chunk on top of the rule's fixed atol.
    n_chunks = -(-inputs["hidden"].shape[0] // opts.get("chunk_size", inputs["hidden"].shape[0]))
    for k in names:
        atol = None
        if k != "hidden" and dtype == torch.float32:
            atol = DEFAULT_ATOL[dtype] + n_chunks * torch.finfo(torch.float32).eps * float(r64[k].grad.abs().max())
        assert_close(
            f"{what} grad {k}",
            ours[k].grad,
            r64[k].grad,
            rb[k].grad,
            atol=atol,
            norm_tol=norm_tol(r64[k].grad, rb[k].grad, dtype),
        )
    return loss
