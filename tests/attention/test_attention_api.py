"""mcg_rope_attention outside the kernels: the CPU (SDPA) path and the reference against float64, input
checks (bad input raises ValueError/TypeError naming the argument), backends, and the custom op."""

from __future__ import annotations

import pytest
import torch

from clinkd_kernels.attention import mcg_rope_attention
from clinkd_kernels.attention.reference import mcg_rope_attention_reference
from clinkd_kernels.rope.layout import axis_tensor
from tests.numerics import assert_close

from .helpers import assert_all_close, fwd_bwd, make_case
from .inputs import SECTIONS, inv_freq


def _cpu(*a, **kw):
    return mcg_rope_attention(*a, backend="cpu", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("form", ["causal-left", "full-right", "causal-packed", "full-packed", "causal-nomask"])
def test_cpu_path_matches_float64_reference(dtype, form):
    causal = form.startswith("causal")
    if form.endswith("packed"):
        case = dict(lengths=[7, 0, 30, 1], hq=6, hkv=2, d=64, pos="image")
    elif form.endswith("nomask"):
        case = dict(b=2, s=31, hq=4, hkv=4, d=80, pos="image")
    else:
        case = dict(b=3, s=29, hq=7, hkv=1, d=96, pad=form.split("-")[1], pos="image")
    t, extra = make_case(torch.device("cpu"), dtype, **case)
    grad = torch.randn(t["q"].shape, dtype=dtype)
    got = fwd_bwd(_cpu, t, extra, grad, causal=causal)
    ref = fwd_bwd(mcg_rope_attention_reference, t, extra, grad, causal=causal, dtype=torch.float64)
    base = fwd_bwd(mcg_rope_attention_reference, t, extra, grad, causal=causal)
    assert_all_close(got, ref, base, group_rounding=True)  # SDPA's GQA backward sums rounded per-head grads


def test_reference_packed_equals_padded_per_sequence():
    """The packed reference treats each sequence alone: it equals the padded reference run per sequence."""
    t, extra = make_case(torch.device("cpu"), torch.float64, lengths=[5, 12], hq=4, hkv=2, d=64, pos="image")
    out = mcg_rope_attention_reference(
        t["q"], t["k"], t["v"], t["position_ids"], t["inv_freq"], t["mrope_section"], **extra
    )
    for lo, hi in ((0, 5), (5, 17)):
        one = mcg_rope_attention_reference(
            t["q"][None, lo:hi],
            t["k"][None, lo:hi],
            t["v"][None, lo:hi],
            t["position_ids"][:, None, lo:hi],
            t["inv_freq"],
            t["mrope_section"],
        )
        assert_close("packed vs padded", out[lo:hi], one[0])


def test_reference_equals_explicit_rotation_then_softmax():
    """Independent formulation of the spec: rotate with cos/sin tables, then a per-head loop of softmax(QKᵀ)V."""
    from clinkd_kernels.rope.reference import mrope_cos_sin

    b, s, hq, hkv, d = 1, 9, 4, 2, 64
    q, k, v = (
        torch.randn(b, s, hq, d, dtype=torch.float64),
        torch.randn(b, s, hkv, d, dtype=torch.float64),
        torch.randn(b, s, hkv, d, dtype=torch.float64),
    )
    pos = torch.randint(0, 50, (3, b, s))
    f = inv_freq(d)
    cos, sin = mrope_cos_sin(pos, f, SECTIONS[d], dtype=torch.float64)  # [b, s, d]
    half = d // 2

    def rot(x):
        x1, x2 = x[..., :half], x[..., half:]
        c, sn = cos[:, :, None, :half], sin[:, :, None, :half]
        return torch.cat([x1 * c - x2 * sn, x2 * c + x1 * sn], -1)

    qr, kr = rot(q), rot(k)
    want = torch.empty_like(q)
    for h in range(hq):
        scores = qr[0, :, h] @ kr[0, :, h // (hq // hkv)].T / d**0.5
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        want[0, :, h] = torch.softmax(scores, -1) @ v[0, :, h // (hq // hkv)]
    got = mcg_rope_attention_reference(q, k, v, pos, f, SECTIONS[d], causal=True)
    assert_close("reference", got, want)


def test_default_backend_on_cpu_is_sdpa_path_and_torch_backend_is_reference():
    t, extra = make_case(torch.device("cpu"), torch.float64, b=1, s=6, hq=2, hkv=1, d=64)
    args = (t["q"], t["k"], t["v"], t["position_ids"], t["inv_freq"], t["mrope_section"])
    ref = mcg_rope_attention_reference(*args)
    assert_close("default", mcg_rope_attention(*args), ref)
    assert torch.equal(mcg_rope_attention(*args, backend="torch"), ref)
    with pytest.raises(ValueError, match="backend"):
        mcg_rope_attention(*args, backend="cuda")


def test_opcheck(interpreter):
    """torch.library.opcheck of the custom op (schema, fake tensor, autograd registration)."""
    t, extra = make_case(interpreter, torch.float32, b=1, s=5, hq=2, hkv=1, d=64)
    q = t["q"].reshape(5, 2, 64).requires_grad_()
    k = t["k"].reshape(5, 1, 64).requires_grad_()
    v = t["v"].reshape(5, 1, 64).requires_grad_()
    pos = t["position_ids"].reshape(3, 5)
    axis = axis_tensor(tuple(t["mrope_section"]), False, q.device)
    args = (q, k, v, pos, t["inv_freq"], axis, None, None, True, 0.125, 1, 5, 5)
    torch.library.opcheck(
        torch.ops.clinkd.mcg_rope_attention_fwd.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
    out, lse = torch.ops.clinkd.mcg_rope_attention_fwd(*args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse) + args[3:]
    torch.library.opcheck(
        torch.ops.clinkd.mcg_rope_attention_bwd.default, bwd_args, test_utils=("test_schema", "test_faketensor")
    )


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def _good(form="padded"):
    d = 64
    if form == "padded":
        b, s = 2, 5
        kw = dict(
            q=torch.randn(b, s, 4, d),
            k=torch.randn(b, s, 2, d),
            v=torch.randn(b, s, 2, d),
            position_ids=torch.arange(s).expand(3, b, s).contiguous(),
            attention_mask=torch.ones(b, s, dtype=torch.long),
        )
    else:
        kw = dict(
            q=torch.randn(7, 4, d),
            k=torch.randn(7, 2, d),
            v=torch.randn(7, 2, d),
            position_ids=torch.arange(7).expand(3, 7).contiguous(),
            cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32),
        )
    kw.update(inv_freq=inv_freq(d), mrope_section=SECTIONS[d])
    return kw


def _call(kw, backend="cpu"):
    kw = dict(kw)
    args = [kw.pop(n) for n in ("q", "k", "v", "position_ids", "inv_freq", "mrope_section")]
    return mcg_rope_attention(*args, backend=backend, **kw)


def _at(name: str, *where: int) -> str:
    """The message of a non-finite q, k or v at (batch, position, head) or (token, head)."""
    at = (
        f"batch {where[0]}, position {where[1]}, head {where[2]}"
        if len(where) == 3
        else f"token {where[0]}, head {where[1]}"
    )
    return rf"^{name} must be finite .*1 \(token, head\) rows hold NaN or ±inf, at \({at}\)$"


BAD = [
    # (id, form, change, exception, message fragment)
    (
        "head-dims-differ",
        "padded",
        lambda kw: kw.update(k=torch.randn(2, 5, 2, 80), v=torch.randn(2, 5, 2, 80)),
        ValueError,
        "head dim",
    ),
    (
        "head-dim-unsupported",
        "padded",
        lambda kw: kw.update(
            q=torch.randn(2, 5, 4, 32), k=torch.randn(2, 5, 2, 32), v=torch.randn(2, 5, 2, 32), inv_freq=inv_freq(32)
        ),
        ValueError,
        "head dim",
    ),
    ("v-shape", "padded", lambda kw: kw.update(v=torch.randn(2, 5, 1, 64)), ValueError, "k and v"),
    (
        "gqa-not-divisible",
        "padded",
        lambda kw: kw.update(k=torch.randn(2, 5, 3, 64), v=torch.randn(2, 5, 3, 64)),
        ValueError,
        "multiple of the KV heads",
    ),
    (
        "batch-mismatch",
        "padded",
        lambda kw: kw.update(k=torch.randn(3, 5, 2, 64), v=torch.randn(3, 5, 2, 64)),
        ValueError,
        "k must have shape",
    ),
    (
        "seq-mismatch",
        "padded",
        lambda kw: kw.update(k=torch.randn(2, 6, 2, 64), v=torch.randn(2, 6, 2, 64)),
        ValueError,
        "k must have shape",
    ),
    ("dtype-mismatch", "padded", lambda kw: kw.update(k=kw["k"].half()), TypeError, "dtype"),
    ("int-q", "padded", lambda kw: kw.update(q=kw["q"].long()), TypeError, "q must have dtype"),
    ("q-1d", "padded", lambda kw: kw.update(q=torch.randn(64)), ValueError, "q must be"),
    (
        "mask-shape",
        "padded",
        lambda kw: kw.update(attention_mask=torch.ones(2, 6, dtype=torch.long)),
        ValueError,
        "attention_mask must have shape",
    ),
    ("mask-dtype", "padded", lambda kw: kw.update(attention_mask=torch.ones(2, 5)), TypeError, "attention_mask"),
    (
        "positions-shape",
        "padded",
        lambda kw: kw.update(position_ids=torch.zeros(3, 2, 4, dtype=torch.long)),
        ValueError,
        "position_ids must have shape",
    ),
    (
        "positions-2-rows",
        "padded",
        lambda kw: kw.update(position_ids=torch.zeros(2, 2, 5, dtype=torch.long)),
        ValueError,
        "position_ids must have shape",
    ),
    ("positions-float", "padded", lambda kw: kw.update(position_ids=torch.zeros(3, 2, 5)), TypeError, "position_ids"),
    (
        "cu-with-padded",
        "padded",
        lambda kw: kw.update(cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)),
        ValueError,
        "cu_seqlens",
    ),
    ("section-sum", "padded", lambda kw: kw.update(mrope_section=(8, 8, 8)), ValueError, "mrope_section"),
    ("section-len", "padded", lambda kw: kw.update(mrope_section=(16, 16)), ValueError, "mrope_section"),
    ("inv-freq-len", "padded", lambda kw: kw.update(inv_freq=inv_freq(64)[:16]), ValueError, "inv_freq"),
    ("scale", "padded", lambda kw: kw.update(softmax_scale=-1.0), ValueError, "softmax_scale"),
    ("causal-type", "padded", lambda kw: kw.update(causal=1), TypeError, "causal"),
    ("cu-missing", "packed", lambda kw: kw.pop("cu_seqlens"), ValueError, "cu_seqlens"),
    ("cu-int64", "packed", lambda kw: kw.update(cu_seqlens=torch.tensor([0, 3, 7])), TypeError, "cu_seqlens"),
    (
        "cu-decreasing",
        "packed",
        lambda kw: kw.update(cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32)),
        ValueError,
        "non-decreasing",
    ),
    (
        "cu-wrong-end",
        "packed",
        lambda kw: kw.update(cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)),
        ValueError,
        "cu_seqlens",
    ),
    (
        "cu-wrong-start",
        "packed",
        lambda kw: kw.update(cu_seqlens=torch.tensor([1, 3, 7], dtype=torch.int32)),
        ValueError,
        "cu_seqlens",
    ),
    (
        "cu-2d",
        "packed",
        lambda kw: kw.update(cu_seqlens=torch.tensor([[0, 3, 7]], dtype=torch.int32)),
        ValueError,
        "cu_seqlens",
    ),
    (
        "mask-with-packed",
        "packed",
        lambda kw: kw.update(attention_mask=torch.ones(7, dtype=torch.long)),
        ValueError,
        "attention_mask",
    ),
    (
        "positions-packed-shape",
        "packed",
        lambda kw: kw.update(position_ids=torch.zeros(3, 1, 7, dtype=torch.long)),
        ValueError,
        "position_ids must have shape",
    ),
    ("max-seqlen-short", "packed", lambda kw: kw.update(max_seqlen=3), ValueError, "max_seqlen"),
    (
        "k-packed-tokens",
        "packed",
        lambda kw: kw.update(k=torch.randn(6, 2, 64), v=torch.randn(6, 2, 64)),
        ValueError,
        "k must have shape",
    ),
    # non-finite inputs (before: a finite output from +inf in q on cpu and triton; the reference gives NaN)
    ("q-inf", "padded", lambda kw: kw["q"].__setitem__((1, 2, 3, 5), float("inf")), ValueError, _at("q", 1, 2, 3)),
    ("k-neg-inf", "padded", lambda kw: kw["k"].__setitem__((0, 4, 1), float("-inf")), ValueError, _at("k", 0, 4, 1)),
    ("v-nan", "padded", lambda kw: kw["v"].__setitem__((1, 0, 0, 63), float("nan")), ValueError, _at("v", 1, 0, 0)),
    ("q-packed-inf", "packed", lambda kw: kw["q"].__setitem__((6, 3), float("inf")), ValueError, _at("q", 6, 3)),
    ("v-packed-nan", "packed", lambda kw: kw["v"].__setitem__((2, 0, 9), float("nan")), ValueError, _at("v", 2, 0)),
]


@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
@pytest.mark.parametrize("form,change,exc,msg", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_refused(interpreter, backend, form, change, exc, msg):
    kw = _good(form)
    change(kw)
    with pytest.raises(exc, match=msg):
        _call(kw, backend=backend)


def test_good_input_is_accepted():
    """The baselines of the bad-input table run (so each refusal above is caused by its one change)."""
    for form in ("padded", "packed"):
        out = _call(_good(form))
        assert out.shape == _good(form)["q"].shape and bool(torch.isfinite(out).all())


def test_bf16_refused_under_interpreter(interpreter):
    if interpreter.type != "cpu":
        pytest.skip("only the interpreter refuses bf16")
    kw = _good()
    kw.update(q=kw["q"].bfloat16(), k=kw["k"].bfloat16(), v=kw["v"].bfloat16())
    with pytest.raises(TypeError, match="bfloat16"):
        _call(kw, backend="triton")


def test_torch_compile_fullgraph(interpreter):
    """The Triton path traces without graph breaks (padded form, with a mask) and matches eager."""
    t, extra = make_case(interpreter, torch.float32, b=2, s=9, hq=2, hkv=1, d=64, pad="left")
    grad = torch.randn(t["q"].shape, device=interpreter)

    def fn(*a, **kw):
        return mcg_rope_attention(*a, backend="triton", **kw)

    eager = fwd_bwd(fn, t, extra, grad, causal=True)
    compiled = fwd_bwd(torch.compile(fn, backend="aot_eager", fullgraph=True), t, extra, grad, causal=True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), eager, compiled):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_empty_inputs(interpreter, backend):
    """Zero tokens (packed, all sequences empty) and S=0 (padded) give empty outputs and gradients."""
    if backend != "triton" and interpreter.type != "cpu":
        pytest.skip("the cpu backend needs CPU tensors")
    f = inv_freq(64).to(interpreter)
    for lead, pos_shape, extra in (
        ((0,), (3, 0), {"cu_seqlens": torch.tensor([0, 0, 0], dtype=torch.int32)}),
        ((2, 0), (3, 2, 0), {}),
    ):
        q = torch.randn(*lead, 2, 64, device=interpreter, requires_grad=True)
        k = torch.randn(*lead, 1, 64, device=interpreter, requires_grad=True)
        v = torch.randn(*lead, 1, 64, device=interpreter, requires_grad=True)
        extra = {n: t.to(interpreter) for n, t in extra.items()}
        out = mcg_rope_attention(
            q,
            k,
            v,
            torch.zeros(pos_shape, dtype=torch.long, device=interpreter),
            f,
            SECTIONS[64],
            backend=backend,
            **extra,
        )
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        assert out.shape == q.shape and (dq is None or dq.shape == q.shape)
