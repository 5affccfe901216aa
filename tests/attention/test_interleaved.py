"""mcg_rope_attention with mrope_interleaved=True (Qwen3-VL's interleaved M-RoPE) against a float64
reference built in this file: transformers' Qwen3-VL rotary recipe (``qwen3vl_rotary`` of
tests/rope/qwen3vl.py, pinned to the installed transformers module by tests/rope/test_interleaved.py)
followed by plain softmax attention.

out, dq, dk, dv are checked with the rule of tests/numerics.py; the baseline is the same reference run in
the input dtype (rotation in fp32 rounded to it, matmuls in it, softmax in fp32), like transformers'
eager attention. Padded form with left padding and packed form (cu_seqlens, 3 sequences of awkward
lengths), causal and not, GQA, D = 128 (24, 20, 20) and D = 64 (12, 10, 10), positions with distinct
t/h/w rows.
"""

from __future__ import annotations

import math

import pytest
import torch

from clinkd_kernels.attention import mcg_rope_attention
from tests.numerics import assert_close
from tests.rope.qwen3vl import inv_freq_for, qwen3vl_rotary

SECTIONS = {128: (24, 20, 20), 64: (12, 10, 10)}


# --------------------------------------------------------------------------------------------------
# Reference


def _attend(q, k, v, pos, inv, sec, *, causal, scale, keep):
    """One padded batch: q [B,S,Hq,D], k/v [B,S,Hkv,D], keep bool [B,S] or None → [B,S,Hq,D]."""
    b, s, hq, _ = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_rot, k_rot = qwen3vl_rotary(q, k, pos, inv, sec, compute=compute)
    group = hq // k.shape[2]
    k_rot = k_rot.repeat_interleave(group, dim=2)
    v_rep = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q_rot, k_rot) * scale
    allowed = torch.ones(b, 1, s, s, dtype=torch.bool)
    if keep is not None:
        allowed = allowed & keep[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(s, s, dtype=torch.bool).tril()
    has_key = allowed.any(-1, keepdim=True)  # rows with no key: output 0 (softmax over all, then × 0)
    scores = scores.masked_fill(~allowed & has_key, float("-inf"))
    probs = (torch.softmax(scores.to(compute), dim=-1) * has_key).to(q.dtype)
    out = torch.einsum("bhij,bjhd->bihd", probs, v_rep)
    if keep is not None:
        out = out * keep[:, :, None, None].to(out.dtype)  # padded query rows: 0
    return out


def attention_reference(q, k, v, pos, inv, sec, *, causal, attention_mask=None, cu_seqlens=None):
    """softmax(rope(q)·rope(k)ᵀ/√D + masks)·v in the dtype of q (float64 for the reference)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is None:
        keep = None if attention_mask is None else attention_mask.bool()
        return _attend(q, k, v, pos, inv, sec, causal=causal, scale=scale, keep=keep)
    bounds = cu_seqlens.tolist()
    return torch.cat(
        [
            _attend(
                q[None, lo:hi],
                k[None, lo:hi],
                v[None, lo:hi],
                pos[:, None, lo:hi],
                inv,
                sec,
                causal=causal,
                scale=scale,
                keep=None,
            )[0]
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ],
        dim=0,
    )


# --------------------------------------------------------------------------------------------------
# Cases


def left_padding(b: int, s: int) -> torch.Tensor:
    """[B, S] long mask, 1 keep / 0 pad on the left: the last row keeps all S tokens, the others 1..S-1."""
    mask = torch.zeros(b, s, dtype=torch.long)
    for i in range(b):
        keep = s if i == b - 1 else int(torch.randint(1, s, (1,)))
        mask[i, s - keep :] = 1
    return mask


def make_case(dtype, *, hq, hkv, d, b=None, s=None, lengths=None):
    """Random CPU inputs, padded (b, s, left padding) or packed (lengths); positions up to 3e4 with
    distinct t/h/w rows (padding tokens at 1, as transformers). Returns (tensors, kwargs)."""
    if lengths is None:
        mask = left_padding(b, s)
        pos = torch.randint(0, 30000, (3, b, s)).masked_fill(mask == 0, 1)
        lead, extra = (b, s), {"attention_mask": mask}
    else:
        pos = torch.randint(0, 30000, (3, sum(lengths)))
        lead = (sum(lengths),)
        extra = {"cu_seqlens": torch.tensor([0] + lengths).cumsum(0).to(torch.int32)}
    t = {
        "q": torch.randn(*lead, hq, d).to(dtype),
        "k": torch.randn(*lead, hkv, d).to(dtype),
        "v": torch.randn(*lead, hkv, d).to(dtype),
        "position_ids": pos,
        "inv_freq": inv_freq_for(d),
        "mrope_section": SECTIONS[d],
    }
    return t, extra


def to(device, t, extra):
    return (
        {n: x.to(device) if isinstance(x, torch.Tensor) else x for n, x in t.items()},
        {n: x.to(device) for n, x in extra.items()},
    )


def fwd_bwd(fn, t, extra, grad, *, causal, dtype=None):
    q, k, v = (t[n].detach().to(dtype or t[n].dtype).requires_grad_() for n in ("q", "k", "v"))
    out = fn(q, k, v, t["position_ids"], t["inv_freq"], t["mrope_section"], causal=causal, **extra)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    return tuple(x.detach().cpu() for x in (out, dq, dk, dv))


def assert_all_close(got, ref, base):
    """out, dq, dk, dv under the §4 rule with atol = one unit of the dtype (1e-6 fp32, 1e-3 fp16) times the
    tensor's magnitude (gradients summed over many rows reach several units), ×4 (fp32) / ×2 (fp16) for
    the gradients. dq, dk pass through dS = P∘(dP − δ), whose cancellation leaves a few ulps of |dP| in
    any implementation that forms δ = rowsum(dO·O) (tests/attention/test_attention.py explains it). dv
    = Pᵀ·dO with P recomputed in the backward as exp(s − lse): the rounding of s − lse (|s − lse| of
    several units at positions up to 3e4) is a relative error of several ulps in every P, which the
    reference, normalising each row directly, does not make, and on a dv whose summed terms Σ P·|dO| are
    larger than |dv| it exceeds one unit of |dv| (SDPA's CPU backward, the cpu backend, does)."""
    for name, g, r, bl in zip(("out", "dq", "dk", "dv"), got, ref, base):
        assert g.dtype == bl.dtype, f"{name}: dtype {g.dtype}, want {bl.dtype}"
        unit = {torch.float32: 1e-6, torch.float16: 1e-3}[g.dtype]
        if name != "out":
            unit *= 4 if g.dtype == torch.float32 else 2
        assert_close(name, g, r, bl, atol=unit * max(1.0, float(r.abs().max())))


def check_against_reference(backend, device, dtype, causal, **case):
    t, extra = make_case(dtype, **case)
    grad = torch.randn(t["q"].shape).to(dtype)
    fn = lambda *a, **kw: mcg_rope_attention(*a, mrope_interleaved=True, backend=backend, **kw)  # noqa: E731
    got = fwd_bwd(fn, *to(device, t, extra), grad.to(device), causal=causal)
    ref = fwd_bwd(attention_reference, t, extra, grad, causal=causal, dtype=torch.float64)
    base = fwd_bwd(attention_reference, t, extra, grad, causal=causal)
    assert_all_close(got, ref, base)
    return t, extra, got


CASES = [
    ("padded-leftpad-gqa3-S13-d128", dict(b=2, s=13, hq=6, hkv=2, d=128)),
    ("padded-leftpad-gqa4-S10-d64", dict(b=3, s=10, hq=4, hkv=1, d=64)),
    ("packed-gqa3-7+1+12-d64", dict(lengths=[7, 1, 12], hq=3, hkv=1, d=64)),
    ("packed-gqa2-9+17+2-d128", dict(lengths=[9, 17, 2], hq=4, hkv=2, d=128)),
]
# backend, dtype: the CPU path (rotation + SDPA) and the "torch" reference backend in fp32; Triton
# (interpreter on CPU) in fp32 and fp16
RUNS = [("cpu", "fp32"), ("torch", "fp32"), ("triton", "fp32"), ("triton", "fp16")]
_DT = {"fp32": torch.float32, "fp16": torch.float16}


@pytest.mark.parametrize("backend, dtype", RUNS, ids=[f"{b}-{d}" for b, d in RUNS])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_float64_reference(interpreter, backend, dtype, causal, case):
    device = interpreter if backend == "triton" else torch.device("cpu")
    t, extra, (out, *_) = check_against_reference(backend, device, _DT[dtype], causal, **case)
    if "attention_mask" in extra:
        pad = extra["attention_mask"] == 0
        assert bool(pad.any()) and bool((out[pad] == 0).all()), "padded query rows are not 0"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_text_positions_layouts_agree(interpreter, backend):
    """t = h = w on every token: the interleaved and contiguous layouts are the same attention."""
    device = interpreter if backend == "triton" else torch.device("cpu")
    t, extra = to(device, *make_case(torch.float32, lengths=[5, 1, 9], hq=2, hkv=1, d=128))
    n = t["position_ids"].shape[1]
    t["position_ids"] = t["position_ids"][:1].expand(3, n)
    args = [t[name] for name in ("q", "k", "v", "position_ids", "inv_freq", "mrope_section")]
    inter = mcg_rope_attention(*args, mrope_interleaved=True, backend=backend, **extra)
    contig = mcg_rope_attention(*args, mrope_interleaved=False, backend=backend, **extra)
    assert torch.equal(inter, contig)
    # and with distinct rows they differ
    t["position_ids"] = torch.randint(0, 30000, (3, n), device=device)
    args[3] = t["position_ids"]
    inter = mcg_rope_attention(*args, mrope_interleaved=True, backend=backend, **extra)
    contig = mcg_rope_attention(*args, mrope_interleaved=False, backend=backend, **extra)
    assert (inter - contig).abs().max() > 0.05
