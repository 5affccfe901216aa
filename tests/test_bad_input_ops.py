"""Bad input at the kernels' boundary: every public op gets many inputs a hostile caller could pass, and each
outcome must be one of two things — a ValueError/TypeError whose message names an argument of the op, or
a result equal to the op's reference. Never a crash, a hang, another exception type or a silent wrong
answer. Calls straight into the C++ extension (past the Python checks) run in a child process, so a crash
there fails a test instead of killing the run.

The first part holds one regression test per defect found so far; the second the property-based hunt.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinkd_kernels import (
    PseudoLabels,
    apply_mrope,
    kd_loss,
    linear_kd_loss,
    mcg_rope_attention,
    mcg_rope_index,
    topk_pseudo_labels,
)
from clinkd_kernels.attention import mcg_rope_attention_reference
from clinkd_kernels.loss import kd_loss_reference
from clinkd_kernels.rope import apply_mrope_reference
from clinkd_kernels.rope_index import mcg_rope_index_reference
from clinkd_kernels.rope_index.device import mcg_rope_index_device
from clinkd_kernels.topk import topk_pseudo_labels_reference

ROOT = Path(__file__).resolve().parent.parent
FAST = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def names_an_argument(error: Exception, names) -> bool:
    """A ValueError/TypeError whose message names one of ``names`` as a word (``k`` in "k must be", not
    the k of "kernel")."""
    return isinstance(error, (ValueError, TypeError)) and any(
        re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", str(error)) for n in names
    )


# --------------------------------------------------------------------------------------------------
# regressions: one test per defect


def _bad_teacher(kind: str, n=6, v=9, row=2):
    t = torch.randn(n, v + 3)
    if kind == "all -inf":
        t[row] = float("-inf")
    else:
        t[row, 4] = float(kind)
    return t


@pytest.mark.parametrize("kind", ["nan", "inf", "all -inf"])
@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_dense_teacher_rows_without_a_distribution_are_refused(kind, backend, request):
    """Before: NaN loss on cpu/triton, a finite wrong value on torch. Now the same error on every backend,
    for valid rows; an ignored row's teacher does not matter."""
    device = request.getfixturevalue("interpreter") if backend == "triton" else torch.device("cpu")
    z, y = torch.randn(6, 9, device=device), torch.randint(0, 9, (6,), device=device)
    t = _bad_teacher(kind).to(device)
    with pytest.raises(ValueError, match=r"teacher logits rows must hold no NaN or \+inf.*rows 2"):
        kd_loss(z, y, teacher_logits=t, backend=backend)
    y[2] = -100
    assert torch.isfinite(kd_loss(z, y, teacher_logits=t, backend=backend))
    h, w = torch.randn(6, 4, device=device), torch.randn(9, 4, device=device)
    th, tw = torch.randn(6, 5, device=device), torch.randn(12, 5, device=device)
    th[3, 1] = float("nan") if kind == "nan" else float("inf")
    y[3] = 1
    with pytest.raises(ValueError, match=r"teacher logits rows must hold.*rows 3"):
        linear_kd_loss(h, w, y, teacher_hidden=th, teacher_weight=tw, chunk_size=4, backend=backend)


@pytest.mark.parametrize("temperature", [1e-40, 1e-50, 1e-300, 1e7, 1e200])
def test_temperatures_the_fp32_kernels_cannot_divide_by(temperature):
    """Before: 1e-40 gave a wrong distribution, 1e-50 a misleading "entirely -inf" error, the extension
    NaN at 1e-300, and t2_scale with a huge temperature a NaN loss."""
    logits = torch.randn(4, 11)
    with pytest.raises(ValueError, match=r"temperature must be in \[1e-06, 1e\+06\]"):
        topk_pseudo_labels(logits, 3, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be in"):
        torch.ops.clinkd.topk_pseudo_labels_ext(logits, 3, temperature)
    y = torch.randint(0, 11, (4,))
    with pytest.raises(ValueError, match="temperature must be in"):
        kd_loss(logits, y, teacher_logits=logits, temperature=temperature, t2_scale=True, backend="cpu")


def test_topk_shapes_a_caller_may_pass():
    """Before: [N, 1] with a non-unit column stride was refused, V = 0 said "k must be in [1, 0]"."""
    column = torch.randn(1, 7).t()  # [7, 1], stride (1, 7)
    assert column.stride(1) != 1
    got, want = topk_pseudo_labels(column, 1), topk_pseudo_labels_reference(column, 1)
    assert torch.equal(got.indices, want.indices) and torch.allclose(got.lse.double(), want.lse, atol=1e-6)
    with pytest.raises(ValueError, match=r"logits must have at least one column \(V >= 1\)"):
        topk_pseudo_labels(torch.randn(3, 0), 1)
    with pytest.raises(ValueError, match="at least one column"):
        torch.ops.clinkd.topk_pseudo_labels_ext(torch.randn(3, 0), 1, 1.0)


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_rope_index_values_that_overflow_int64(path):
    """Before (CPU path): a grid whose t·(h/m)·(w/m) wraps int64 to the run's length was accepted, and a
    modality_gap that wraps positions negative gave negative positions (the public op checks the gap for
    both paths)."""
    ids = torch.tensor([[1, 7, 9, 9, 9, 9, 3]])
    kw = dict(image_token_id=9, video_token_id=10)
    call = (
        mcg_rope_index
        if path == "cpu"
        else (
            lambda i, image_grid_thw, modality_gap=2, **k: mcg_rope_index_device(
                i, image_grid_thw, None, None, 9, 10, None, 2, modality_gap, 1, 1
            )
        )
    )
    wrapping = torch.tensor([[2**62 + 1, 4, 4]])  # (2^62 + 1)·2·2 = 2^64 + 4: "4 tokens" in int64
    with pytest.raises(ValueError, match=r"image_grid_thw\[0\] = .* needs t·\(h/2\)·\(w/2\) = 18446744073709551620"):
        call(ids, image_grid_thw=wrapping, **kw)
    for gap in (2**62, 2**55):  # 2^55: the device path's float64 positions were off by up to 4
        with pytest.raises(ValueError, match=rf"modality_gap={gap} .* beyond 2\^53"):
            mcg_rope_index(ids, image_grid_thw=torch.tensor([[1, 4, 4]]), modality_gap=gap, **kw)


def test_pseudo_labels_whose_probabilities_sum_above_one():
    """Before: accepted (a "distribution" of mass 1.5 and a residual of 0)."""
    z, y = torch.randn(5, 20), torch.randint(0, 20, (5,))
    lp = torch.log(torch.full((5, 3), 0.5))
    teacher = PseudoLabels(
        torch.tensor([[0, 1, 2]] * 5, dtype=torch.int32), lp, torch.zeros(5), torch.zeros(5), torch.zeros(5)
    )
    for backend in ("cpu", "torch"):
        with pytest.raises(ValueError, match=r"teacher.logprobs must be the log-probabilities of one distribution"):
            kd_loss(z, y, teacher=teacher, backend=backend)


def _device(backend: str, request) -> torch.device:
    return request.getfixturevalue("interpreter") if backend == "triton" else torch.device("cpu")


def _poison(x: torch.Tensor, kind: str, at: tuple) -> torch.Tensor:
    """x with one entry (or, for "all -inf", the row ``at`` names) set to a non-finite value."""
    x = x.clone()
    x[at] = float("-inf") if kind == "all -inf" else float(kind)
    return x


def _attention_case(form: str, device, d=64):
    """(q, k, v, position_ids, inv_freq, section, kwargs) of a fresh random padded or packed call."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    if form == "padded":
        b, s = 2, 5
        shapes, pos = ((b, s, 4, d), (b, s, 2, d)), torch.arange(s).expand(3, b, s)
        kw = dict(attention_mask=torch.ones(b, s, dtype=torch.long, device=device))
    else:
        shapes, pos = ((7, 4, d), (7, 2, d)), torch.arange(7).expand(3, 7)
        kw = dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32, device=device))
    q, k, v = (torch.randn(shape, device=device) for shape in (shapes[0], shapes[1], shapes[1]))
    return q, k, v, pos.contiguous().to(device), inv.to(device), (16, 8, 8), kw


@pytest.mark.parametrize("kind", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("form", ["padded", "packed"])
@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_attention_non_finite_inputs_are_refused(kind, name, form, backend, request):
    """Before: +inf in q gave a finite output on cpu and triton (the reference: NaN), with no error. Now
    every backend refuses a NaN or ±inf in q, k or v by name, token and head."""
    device = _device(backend, request)
    q, k, v, pos, inv, section, kw = _attention_case(form, device)
    at, where = (
        ((1, 3, 1, 7), r"\(batch 1, position 3, head 1\)") if form == "padded" else ((5, 1, 0), r"\(token 5, head 1\)")
    )
    tensors = dict(q=q, k=k, v=v)
    tensors[name] = _poison(tensors[name], kind, at)
    with pytest.raises(ValueError, match=rf"^{name} must be finite .*1 \(token, head\) rows .*{where}"):
        mcg_rope_attention(*tensors.values(), pos, inv, section, backend=backend, **kw)
    assert torch.isfinite(mcg_rope_attention(q, k, v, pos, inv, section, backend=backend, **kw)).all()


@pytest.mark.parametrize("kind", ["nan", "inf", "all -inf"])
@pytest.mark.parametrize("backend", ["cpu", "portable", "torch", "triton"])
def test_student_rows_without_a_distribution_are_refused(kind, backend, request):
    """Before: a labelled student row that is entirely −inf gave a NaN loss (NaN or +inf likewise), with
    no error. Now refused by row on every backend, as dense teacher rows are; an ignored row's student
    logits do not matter. linear_kd_loss refuses the rows whose hidden @ weight.T has no distribution."""
    device = _device(backend, request)
    z, y = torch.randn(6, 9, device=device), torch.randint(0, 9, (6,), device=device)
    bad = _poison(z, kind, (2,) if kind == "all -inf" else (2, 4))
    t = torch.randn(6, 12, device=device)
    for teacher in (dict(teacher_logits=t), dict(alpha=0.0)):
        with pytest.raises(ValueError, match=r"^student_logits rows with a label must hold no NaN or \+inf.*rows 2 "):
            kd_loss(bad, y, backend=backend, **teacher)
    y2 = y.clone()
    y2[2] = -100
    assert torch.isfinite(kd_loss(bad, y2, teacher_logits=t, backend=backend))
    h, w = torch.randn(6, 4, device=device), torch.randn(9, 4, device=device)
    w[0, 1] = 1.0  # so that +inf in h[3, 1] makes a +inf logit (−inf ones alone would be a masked vocabulary)
    hb = _poison(h, kind if kind != "all -inf" else "nan", (3, 1))
    for teacher in (
        dict(teacher_hidden=torch.randn(6, 5, device=device), teacher_weight=torch.randn(12, 5, device=device)),
        {},
    ):
        with pytest.raises(ValueError, match=r"student logits hidden @ weight.T \(\+ bias\) rows .*rows 3 "):
            linear_kd_loss(hb, w, y, chunk_size=4, backend=backend, alpha=0.5 if teacher else 0.0, **teacher)
    y2[3] = -100
    assert torch.isfinite(linear_kd_loss(hb, w, y2, chunk_size=4, backend=backend, alpha=0.0))


def _index_call(**over):
    ids = torch.tensor([[1, 7, 9, 9, 9, 9, 3], [1, 2, 3, 4, 5, 6, 8]])
    kw = dict(image_grid_thw=torch.tensor([[1, 4, 4]]), attention_mask=torch.ones(2, 7, dtype=torch.long))
    kw.update(over)
    return mcg_rope_index(kw.pop("input_ids", ids), image_token_id=9, video_token_id=10, **kw)


def _meta_calls():
    """(name of the meta argument, a call that passes it on the meta device), for every tensor argument
    of every public op."""
    meta = lambda t: t.to("meta")  # noqa: E731
    n, v, hd = 5, 11, 4
    z, y = torch.randn(n, v), torch.randint(0, v, (n,))
    lp = torch.log_softmax(torch.randn(n, v), 1)[:, :2]
    pl = dict(
        indices=torch.tensor([[0, 1]] * n, dtype=torch.int32),
        logprobs=lp,
        lse=torch.zeros(n),
        margin=torch.zeros(n),
        residual=(1 - lp.exp().sum(1)).clamp(min=0),
    )

    def kd(**m):
        kw = dict(student_logits=z, labels=y, teacher_logits=torch.randn(n, v), token_weights=torch.ones(n))
        kw.update({key: meta(kw[key]) for key in m})
        return lambda: kd_loss(kw.pop("student_logits"), kw.pop("labels"), backend="cpu", **kw)

    def sparse(field):
        fields = {**pl, field: meta(pl[field])}
        return lambda: kd_loss(z, y, teacher=PseudoLabels(**fields), backend="cpu")

    def lin(*m):
        kw = dict(
            hidden=torch.randn(n, hd),
            weight=torch.randn(v, hd),
            labels=y,
            bias=torch.randn(v),
            teacher_hidden=torch.randn(n, hd),
            teacher_weight=torch.randn(v, hd),
            teacher_bias=torch.randn(v),
            token_weights=torch.ones(n),
        )
        kw.update({key: meta(kw[key]) for key in m})
        return lambda: linear_kd_loss(kw.pop("hidden"), kw.pop("weight"), kw.pop("labels"), backend="cpu", **kw)

    def attn(name):
        q, k, v_, pos, inv, section, kw = _attention_case("packed", torch.device("cpu"))
        args = dict(q=q, k=k, v=v_, position_ids=pos, inv_freq=inv, cu_seqlens=kw["cu_seqlens"])
        args[name] = meta(args[name])
        cu = args.pop("cu_seqlens")
        return lambda: mcg_rope_attention(*args.values(), section, cu_seqlens=cu, backend="cpu")

    def rope(name):
        q, k, _, pos, inv, section, _ = _attention_case("packed", torch.device("cpu"))
        args = dict(q=q, k=k, position_ids=pos, inv_freq=inv)
        args[name] = meta(args[name])
        return lambda: apply_mrope(*args.values(), section, backend="cpu")

    def index(name):
        ids = torch.tensor([[1, 7, 9, 9, 9, 9, 3], [1, 2, 3, 4, 5, 6, 8]])
        grids = dict(image_grid_thw=torch.tensor([[1, 4, 4]]), video_grid_thw=torch.zeros(0, 3, dtype=torch.long))
        args = dict(input_ids=ids, attention_mask=torch.ones(2, 7, dtype=torch.long), **grids)
        args["video_time_interval"] = torch.ones(0)
        args[name] = meta(args[name])
        return lambda: _index_call(**args)

    yield from (("topk", "logits", lambda: topk_pseudo_labels(meta(z), 2, backend="cpu")),)
    for name in ("student_logits", "labels", "teacher_logits", "token_weights"):
        yield "kd_loss", name, kd(**{name: True})
    for field in ("indices", "logprobs", "residual"):
        yield "kd_loss", f"teacher.{field}", sparse(field)
    for name in ("hidden", "weight", "labels", "bias", "teacher_hidden", "teacher_weight", "teacher_bias"):
        yield "linear_kd_loss", name, lin(name)
    yield "linear_kd_loss", "token_weights", lin("token_weights")
    for name in ("q", "k", "v", "position_ids", "inv_freq", "cu_seqlens"):
        yield "mcg_rope_attention", name, attn(name)
    for name in ("q", "k", "position_ids", "inv_freq"):
        yield "apply_mrope", name, rope(name)
    for name in ("input_ids", "image_grid_thw", "video_grid_thw", "attention_mask", "video_time_interval"):
        yield "mcg_rope_index", name, index(name)


META_CALLS = list(_meta_calls())


@pytest.mark.parametrize("op,name,call", META_CALLS, ids=[f"{op}-{name}" for op, name, _ in META_CALLS])
def test_meta_tensors_are_refused_by_name(op, name, call):
    """Before: e.g. mcg_rope_index with image_grid_thw on the meta device raised torch's "Cannot copy out
    of meta tensor; no data!" (naming neither); other ops said "... is on meta but ... is on cpu" or
    failed in a kernel. Now every tensor argument of every op is refused by name before any work."""
    with pytest.raises(ValueError, match=rf"^{re.escape(name)} is on the meta device, which holds no data"):
        call()


def test_rope_index_grid_on_another_device_is_refused():
    """A grid lives on the CPU or on input_ids' device; the meta device is neither (nor a device at all)."""
    with pytest.raises(ValueError, match=r"^image_grid_thw is on the meta device"):
        _index_call(image_grid_thw=torch.tensor([[1, 4, 4]], device="meta"))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"image_grid_thw is on cpu but input_ids is on cuda|grid"):
            _index_call(
                input_ids=torch.ones(1, 3, dtype=torch.long),
                image_grid_thw=torch.ones(1, 3, dtype=torch.long, device="cuda"),
            )


# --------------------------------------------------------------------------------------------------
# the hunt: many bad (and good) inputs per op

KD_NAMES = (
    "student_logits",
    "labels",
    "teacher",
    "temperature",
    "alpha",
    "beta",
    "ignore_index",
    "token_weights",
    "reduction",
    "V",
)


@st.composite
def kd_calls(draw):
    n, v = draw(st.integers(0, 5)), draw(st.integers(0, 7))
    z = draw(st.sampled_from(["ok", "1d", "int", "nan-row", "inf"]))
    logits = {
        "ok": torch.randn(n, v),
        "1d": torch.randn(v),
        "int": torch.randint(0, 3, (n, v)),
        "nan-row": torch.randn(n, v).index_fill_(0, torch.arange(min(n, 1)), float("nan")),
        "inf": torch.randn(n, v).masked_fill_(torch.rand(n, v) < 0.3, float("-inf")),
    }[z]  # masked vocabulary
    labels = draw(st.sampled_from(["ok", "range", "float", "short", "ignored"]))
    hi = max(v, 1)
    y = {
        "ok": torch.randint(0, hi, (n,)),
        "range": torch.full((n,), v + 3),
        "float": torch.rand(n),
        "short": torch.randint(0, hi, (max(n - 1, 0),)),
        "ignored": torch.full((n,), -100),
    }[labels]
    teacher = draw(st.sampled_from(["dense", "dense-narrow", "dense-nan", "none", "sparse", "sparse-bad"]))
    kw = dict(
        temperature=draw(st.sampled_from([1.0, 0.5, 0.0, -1.0, float("nan"), 1e-9, "2"])),
        alpha=draw(st.sampled_from([0.5, 0.0, -1.0])),
        beta=draw(st.sampled_from([1.0, 0.0])),
        reduction=draw(st.sampled_from(["mean", "sum", "none", "avg"])),
    )
    if teacher.startswith("dense"):
        t = torch.randn(n, v + 2 if teacher != "dense-narrow" else max(v - 1, 0))
        if teacher == "dense-nan" and n:
            t[0, 0] = float("nan")
        kw["teacher_logits"] = t
    elif teacher.startswith("sparse") and v:
        k = min(2, v)
        idx = torch.stack([torch.randperm(v)[:k] for _ in range(n)]) if n else torch.zeros(0, k, dtype=torch.long)
        lp = torch.log_softmax(torch.randn(n, v), -1).gather(1, idx) if n else torch.zeros(0, k)
        if teacher == "sparse-bad" and n:
            idx[0, 0] = v + 5
        kw["teacher"] = PseudoLabels(idx.int(), lp, torch.zeros(n), torch.zeros(n), (1 - lp.exp().sum(1)).clamp(min=0))
    return logits, y, kw


@FAST
@given(kd_calls(), st.sampled_from(["cpu", "torch"]))
def test_kd_loss_any_input(call, backend):
    logits, y, kw = call
    try:
        got = kd_loss(logits, y, backend=backend, **kw)
    except Exception as e:  # noqa: BLE001 - the category of the outcome is what is tested
        assert names_an_argument(e, KD_NAMES), repr(e)
        return
    ref = kd_loss_reference(
        logits.double(),
        y,
        **{k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()},
    )
    assert torch.allclose(got.double(), ref.double(), rtol=1e-4, atol=1e-5, equal_nan=True), (got, ref)


@FAST
@given(
    st.integers(0, 4),
    st.integers(0, 9),
    st.integers(-1, 11),
    st.sampled_from([1.0, 0.3, 0.0, -2.0, float("inf"), 1e-7]),
    st.sampled_from(["ok", "nan", "-inf", "+inf", "int"]),
    st.sampled_from(["cpu", "torch"]),
)
def test_topk_any_input(n, v, k, temperature, fill, backend):
    logits = torch.randn(n, v)
    if fill == "int":
        logits = logits.long()
    elif fill != "ok" and n and v:
        logits[0] = float(fill) if fill != "nan" else float("nan")
    try:
        got = topk_pseudo_labels(logits, k, temperature=temperature, backend=backend)
    except Exception as e:  # noqa: BLE001
        assert names_an_argument(e, ("logits", "k", "temperature")), repr(e)
        return
    want = topk_pseudo_labels_reference(logits, k, temperature=temperature)
    assert torch.equal(got.indices.long(), want.indices.long())
    for name in ("logprobs", "lse", "margin", "residual"):
        a, b = getattr(got, name).double(), getattr(want, name)
        assert torch.equal(a.isinf(), b.isinf()) and torch.equal(a.isnan(), b.isnan()), name  # same infinities
        finite = torch.isfinite(b)
        assert torch.allclose(a[finite], b[finite], atol=2e-5), name


@st.composite
def index_calls(draw):
    rows = draw(st.integers(1, 3))
    ids, grids = [], []
    for _ in range(rows):
        seq = [draw(st.integers(0, 8)) for _ in range(draw(st.integers(0, 4)))]
        if draw(st.booleans()):
            t, h, w = draw(st.integers(1, 2)), 2 * draw(st.integers(1, 2)), 2 * draw(st.integers(1, 3))
            seq += [20] + [9] * (t * h * w // 4) + [21]
            grids.append([t, h, w])
        seq += [draw(st.integers(0, 8)) for _ in range(draw(st.integers(0, 3)))]
        ids.append(seq)
    longest = max(1, max(len(s) for s in ids))
    input_ids = torch.tensor([s + [0] * (longest - len(s)) for s in ids])
    mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in ids])
    damage = draw(
        st.sampled_from(
            [
                "none",
                "drop-grid",
                "extra-grid",
                "bad-grid",
                "zero-grid",
                "huge-grid",
                "gap",
                "stride",
                "mask-shape",
                "float-ids",
            ]
        )
    )
    grid = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
    kw = dict(
        image_grid_thw=grid,
        attention_mask=mask,
        modality_gap=draw(st.integers(1, 3)),
        vision_stride=draw(st.integers(1, 2)),
    )
    if damage == "drop-grid" and len(grids):
        kw["image_grid_thw"] = grid[1:]
    elif damage == "extra-grid":
        kw["image_grid_thw"] = torch.cat([grid, torch.tensor([[1, 2, 2]])])
    elif damage == "bad-grid" and len(grids):
        kw["image_grid_thw"] = grid + torch.tensor([0, 1, 0])
    elif damage == "zero-grid" and len(grids):
        kw["image_grid_thw"] = grid * torch.tensor([0, 1, 1])
    elif damage == "huge-grid" and len(grids):
        kw["image_grid_thw"] = grid * torch.tensor([2**61, 1, 1])
    elif damage == "gap":
        kw["modality_gap"] = draw(st.sampled_from([0, -1, 2**62]))
    elif damage == "stride":
        kw["vision_stride"] = draw(st.sampled_from([0, -3]))
    elif damage == "mask-shape":
        kw["attention_mask"] = mask[:, :-1] if mask.shape[1] > 1 else mask[:0]
    elif damage == "float-ids":
        input_ids = input_ids.float()
    return input_ids, kw


@FAST
@given(index_calls())
def test_mcg_rope_index_any_input(call):
    """The public op (its checks, then the CPU path) and, for what it accepts, the device path too."""
    input_ids, kw = call
    names = ("row", "input_ids", "image_grid_thw", "attention_mask", "modality_gap", "vision_stride")
    try:
        got = mcg_rope_index(input_ids, image_token_id=9, video_token_id=10, vision_start_token_id=20, **kw)
    except Exception as e:  # noqa: BLE001
        assert names_an_argument(e, names), repr(e)
        return
    want = mcg_rope_index_reference(input_ids, image_token_id=9, video_token_id=10, vision_start_token_id=20, **kw)
    device = mcg_rope_index_device(
        input_ids,
        kw["image_grid_thw"],
        None,
        kw["attention_mask"],
        9,
        10,
        20,
        2,
        kw["modality_gap"],
        kw["vision_stride"],
        1,
    )
    for pos, deltas in (got, device):
        assert torch.equal(pos, want[0]) and torch.equal(deltas, want[1])


@FAST
@given(
    st.sampled_from([(2, 3, 4, 2, 64), (1, 1, 2, 2, 80), (1, 2, 3, 2, 64), (1, 2, 2, 2, 48)]),
    st.sampled_from(["ok", "pos-shape", "section", "freq-dtype", "dtype-mix", "scale"]),
    st.booleans(),
)
def test_rotation_and_attention_any_input(shape, damage, attention):
    b, s, hq, hkv, d = shape
    q, k, v = torch.randn(b, s, hq, d), torch.randn(b, s, hkv, d), torch.randn(b, s, hkv, d)
    pos = torch.randint(0, 50, (3, b, s))
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    section = [d // 8, d // 8, d // 2 - d // 4]
    extra = {}
    if damage == "pos-shape":
        pos = pos[:, :, :-1] if s > 1 else pos[:2]
    elif damage == "section":
        section = [1, 1, 1]
    elif damage == "freq-dtype":
        inv = inv.long()
    elif damage == "dtype-mix":
        k = k.half()
    elif damage == "scale":
        extra = {"softmax_scale": -1.0} if attention else {"attention_scaling": float("nan")}
    names = (
        "q",
        "k",
        "v",
        "position_ids",
        "inv_freq",
        "mrope_section",
        "head dim",
        "softmax_scale",
        "attention_scaling",
        "query heads",
    )
    try:
        if attention:
            got = mcg_rope_attention(q, k, v, pos, inv, section, backend="cpu", **extra)
        else:
            got = apply_mrope(q, k, pos, inv, section, backend="cpu", **extra)[0]
    except Exception as e:  # noqa: BLE001
        assert names_an_argument(e, names), repr(e)
        return
    assert damage == "ok", f"accepted {damage}"
    if attention:
        want = mcg_rope_attention_reference(q.double(), k.double(), v.double(), pos, inv, section)
    else:
        want = apply_mrope_reference(q.double(), k.double(), pos, inv, section)[0]
    assert torch.allclose(got.double(), want, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# the C++ extension, called straight (no Python checks), in a child process

_CHILD = r"""
import json, random, sys, torch
import clinkd_kernels  # loads the extension
random.seed(int(sys.argv[1])); torch.manual_seed(int(sys.argv[1]))
op = torch.ops.clinkd.topk_pseudo_labels_ext
outcomes = []
for _ in range(int(sys.argv[2])):
    n, v = random.randint(0, 5), random.randint(0, 40)
    dtype = random.choice([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32])
    base = (torch.randn(n, v * 3 + 1) * random.choice([1, 1e4])).to(dtype)
    view = random.choice(["contig", "cols", "rows", "t", "3d"])
    x = {"contig": base[:, :v], "cols": base[:, ::3][:, :v], "rows": base[::2, :v],
         "t": base[:, :v].t(), "3d": base[:, :v].unsqueeze(0)}[view]
    if x.is_floating_point() and x.numel() and random.random() < 0.3:
        x = x.clone(); x[(0,) * x.dim()] = random.choice([float("nan"), float("inf"), -float("inf")])
    k = random.choice([-1, 0, 1, 2, v, v + 1, 1025, 2**40])
    t = random.choice([1.0, 0.5, 0.0, -1.0, 1e-300, 1e300, float("nan")])
    try:
        r = op(x, k, t)
        ok = r[0].shape == (x.shape[0], k) and all(int(i) < x.shape[1] for i in r[0].flatten()[:50])
        outcomes.append("ok" if ok else f"bad result {view} {list(x.shape)} k={k}")
    except (ValueError, TypeError, RuntimeError) as e:
        outcomes.append(type(e).__name__ + ": " + str(e).splitlines()[0][:120])
print(json.dumps(outcomes))
"""


@pytest.mark.parametrize("seed", [1, 2])
def test_extension_never_crashes_on_adversarial_calls(seed):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(seed), "150"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, f"the extension crashed (exit {out.returncode}): {out.stderr[-2000:]}"
    outcomes = json.loads(out.stdout.strip().splitlines()[-1])
    wrong = [o for o in outcomes if o.startswith("bad result")]
    assert not wrong, wrong
    errors = [o for o in outcomes if o != "ok"]
    unclear = [o for o in errors if not any(w in o for w in ("logits", "k must", "temperature", "stride", "V must"))]
    assert not unclear, unclear  # every refusal names what was wrong
