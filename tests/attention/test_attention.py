"""Triton MCG-RoPE attention (interpreter on CPU, compiled on CUDA) against the float64 reference.

Every case checks out, dq, dk, dv with the rule of tests/numerics.py; the baseline is the same reference run in
the input dtype. Cases are hand-picked to cover, between them: causal and not, GQA ratios 1/4/7,
S ∈ {1, 17, 129} (not multiples of the blocks), left and right padding, packed batches of unequal
lengths (one empty), D ∈ {64, 72, 80, 96, 128} (72 and 80 also as non-causal packed vision layers),
text-only and image-run positions.
"""

from __future__ import annotations

import pytest
import torch

from clinkd_kernels.attention import mcg_rope_attention
from clinkd_kernels.attention.reference import mcg_rope_attention_reference

from .helpers import assert_all_close, fwd_bwd, make_case

_DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_against_reference(device, dtype, causal, **case):
    t, extra = make_case(device, dtype, **case)
    grad = torch.randn(t["q"].shape, dtype=dtype, device=device)
    triton_fn = lambda *a, **kw: mcg_rope_attention(*a, backend="triton", **kw)  # noqa: E731
    got = fwd_bwd(triton_fn, t, extra, grad, causal=causal)
    ref = fwd_bwd(mcg_rope_attention_reference, t, extra, grad, causal=causal, dtype=torch.float64)
    base = fwd_bwd(mcg_rope_attention_reference, t, extra, grad, causal=causal)
    assert_all_close(got, ref, base)
    return t, extra, got


CASES = [
    # id: dtype, causal, case
    ("fp32-causal-gqa4-S17-d64", "fp32", True, dict(b=2, s=17, hq=4, hkv=1, d=64)),
    ("fp16-full-mha-S129-d128-image", "fp16", False, dict(b=1, s=129, hq=2, hkv=2, d=128, pos="image")),
    ("fp16-causal-gqa7-S1-d80", "fp16", True, dict(b=2, s=1, hq=7, hkv=1, d=80)),
    (
        "fp32-causal-leftpad-gqa2-S33-d80-image",
        "fp32",
        True,
        dict(b=2, s=33, hq=4, hkv=2, d=80, pad="left", pos="image"),
    ),
    ("fp16-full-rightpad-gqa7-S17-d64", "fp16", False, dict(b=2, s=17, hq=7, hkv=1, d=64, pad="right")),
    (
        "fp16-causal-leftpad-gqa2-S129-d128-image",
        "fp16",
        True,
        dict(b=2, s=129, hq=2, hkv=1, d=128, pad="left", pos="image"),
    ),
    ("fp16-causal-rightpad-mha-S40-d96", "fp16", True, dict(b=2, s=40, hq=2, hkv=2, d=96, pad="right")),
    ("fp16-causal-packed-gqa4-d128-image", "fp16", True, dict(lengths=[1, 17, 50], hq=4, hkv=1, d=128, pos="image")),
    ("fp32-full-packed-mha-d64-empty-seq", "fp32", False, dict(lengths=[33, 0, 9], hq=3, hkv=3, d=64)),
    ("fp32-causal-packed-gqa4-S129-d80-image", "fp32", True, dict(lengths=[129, 20], hq=4, hkv=1, d=80, pos="image")),
    # a vision tower's layer: not causal, packed per image, D = 72 (Qwen3-VL's, half tile padded 36 → 64)
    ("fp32-full-packed-mha-d72-image", "fp32", False, dict(lengths=[40, 7, 65], hq=2, hkv=2, d=72, pos="image")),
    ("fp16-full-packed-mha-d80-image", "fp16", False, dict(lengths=[64, 33], hq=2, hkv=2, d=80, pos="image")),
]


@pytest.mark.parametrize("dtype,causal,case", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_float64_reference(interpreter, dtype, causal, case):
    check_against_reference(interpreter, _DT[dtype], causal, **case)


@pytest.mark.parametrize(
    "blocks,k_rotation",
    [
        ({"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)}, "in_kernel"),
        ({"fwd": (16, 64), "dkdv": (64, 16), "dq": (16, 64)}, "prepass"),
    ],
    ids=["blocks16-in-kernel", "blocks16x64-k-prepass"],
)
def test_other_blocks_and_k_prerotation(interpreter, monkeypatch, blocks, k_rotation):
    """Other block shapes (equal; BLOCK_N > BLOCK_M) and the forward with K rotated by a prepass."""
    from clinkd_kernels.attention import launch

    if interpreter.type == "cpu":
        monkeypatch.setattr(launch, "INTERPRETER_BLOCKS", blocks)
    monkeypatch.setenv("CLINKD_ATTN_K_ROTATION", k_rotation)
    check_against_reference(interpreter, torch.float16, True, b=2, s=45, hq=4, hkv=2, d=80, pad="left", pos="image")
    check_against_reference(interpreter, torch.float32, False, lengths=[3, 40], hq=3, hkv=1, d=64, pos="image")


def test_padded_rows_and_keys_are_exactly_zero(interpreter):
    """Padded query rows output 0 and get no gradient; padded keys get zero dk, dv."""
    t, extra, (out, dq, dk, dv) = check_against_reference(
        interpreter, torch.float16, True, b=2, s=23, hq=4, hkv=2, d=64, pad="left"
    )
    pad = extra["attention_mask"] == 0
    assert bool(pad.any())
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert bool((x[pad] == 0).all()), f"{name} is not zero on padded tokens"


def test_deterministic(interpreter):
    """Two forward+backward runs are bit-identical (no atomics)."""
    t, extra = make_case(interpreter, torch.float16, lengths=[21, 40], hq=4, hkv=1, d=64, pos="image")
    grad = torch.randn(t["q"].shape, dtype=torch.float16, device=interpreter)
    fn = lambda *a, **kw: mcg_rope_attention(*a, backend="triton", **kw)  # noqa: E731
    first = fwd_bwd(fn, t, extra, grad, causal=True)
    second = fwd_bwd(fn, t, extra, grad, causal=True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two runs"


def test_softmax_scale_and_max_seqlen(interpreter):
    """A non-default softmax_scale and an explicit (larger) max_seqlen give the reference result."""
    t, extra = make_case(interpreter, torch.float32, lengths=[5, 19], hq=2, hkv=1, d=64, pos="image")
    grad = torch.randn(t["q"].shape, device=interpreter)
    fn = lambda *a, **kw: mcg_rope_attention(*a, backend="triton", softmax_scale=0.3, max_seqlen=32, **kw)  # noqa: E731
    reff = lambda *a, **kw: mcg_rope_attention_reference(*a, softmax_scale=0.3, **kw)  # noqa: E731
    got = fwd_bwd(fn, t, extra, grad, causal=False)
    ref = fwd_bwd(reff, t, extra, grad, causal=False, dtype=torch.float64)
    base = fwd_bwd(reff, t, extra, grad, causal=False)
    assert_all_close(got, ref, base)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [64, 72, 80, 96, 128])
def test_bf16_cuda(causal, d):
    """bf16 on a GPU (the interpreter cannot multiply bf16): padded with left padding, and packed."""
    device = torch.device("cuda")
    check_against_reference(device, torch.bfloat16, causal, b=2, s=300, hq=28, hkv=4, d=d, pad="left", pos="image")
    check_against_reference(device, torch.bfloat16, causal, lengths=[1, 257, 700], hq=12, hkv=2, d=d, pos="image")


@pytest.mark.gpu
def test_fp16_cuda_long_packed():
    device = torch.device("cuda")
    check_against_reference(device, torch.float16, True, lengths=[1000, 3, 1500], hq=7, hkv=1, d=128, pos="image")
