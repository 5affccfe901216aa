"""The C++ CPU rotation (csrc/rope/mrope_rotate_cpu.cpp) against the PyTorch CPU path it replaced (the
fallback where the extension is not built) and the float64 reference, and its own argument checks."""

from __future__ import annotations

import pytest
import torch

import clinkd_kernels.rope.cpu as cpu
from clinkd_kernels import apply_mrope
from clinkd_kernels.rope import apply_mrope_reference
from clinkd_kernels.rope.layout import axis_tensor
from tests.numerics import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_the_kernel_equals_the_torch_path_and_the_reference(dtype, interleaved, monkeypatch):
    B, S, Hq, Hkv, D = 2, 37, 6, 2, 64
    fused = torch.randn(B, S, Hq + 2 * Hkv, D).to(dtype)  # strided views of a fused projection
    q, k = fused[:, :, :Hq], fused[:, :, Hq : Hq + Hkv]
    pos = torch.randint(0, 30000, (3, B, S))
    inv = 1.0 / 1e6 ** (torch.arange(0, D, 2, dtype=torch.float64) / D).float()
    sec = (12, 10, 10)
    got = apply_mrope(q, k, pos, inv, sec, attention_scaling=0.8, mrope_interleaved=interleaved, backend="cpu")
    ref = apply_mrope_reference(
        q.double(), k.double(), pos, inv, sec, attention_scaling=0.8, mrope_interleaved=interleaved
    )
    base = apply_mrope_reference(q, k, pos, inv, sec, attention_scaling=0.8, mrope_interleaved=interleaved)
    monkeypatch.setattr(cpu, "extension", lambda: None)
    torch_path = apply_mrope(q, k, pos, inv, sec, attention_scaling=0.8, mrope_interleaved=interleaved, backend="cpu")
    for name, g, r, b, t in zip("qk", got, ref, base, torch_path):
        assert_close(f"{name} kernel", g, r, b)
        assert_close(f"{name} torch path", t, r, b)


def _ext(**overrides):
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8)
    args = dict(
        q=q,
        k=k,
        q_out=torch.empty_like(q),
        k_out=torch.empty_like(k),
        position_ids=torch.zeros(3, 1, 3, dtype=torch.long),
        inv_freq=torch.ones(4),
        axis=axis_tensor((2, 1, 1), False, "cpu"),
        scale=1.0,
        inverse=False,
    )
    args.update(overrides)
    torch.ops.clinkd.mrope_rotate_ext(*args.values())


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(q=torch.randn(3, 2, 8)), "q must be 4-D"),
        (dict(k=torch.randn(1, 4, 1, 8)), r"k must have shape \[1, 3, H, 8\]"),
        (dict(q_out=torch.empty(1, 3, 2, 8).transpose(1, 2)), "q_out must be a contiguous tensor"),
        (dict(position_ids=torch.zeros(3, 1, 2, dtype=torch.long)), r"position_ids must have shape \[3, 1, 3\]"),
        (dict(position_ids=torch.zeros(3, 1, 3)), "position_ids must be int64 or int32"),
        (dict(inv_freq=torch.ones(5)), r"inv_freq must be a contiguous float32 \[4\]"),
        (dict(axis=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), r"axis\[3\] = 3 is not a position row"),
        (dict(axis=torch.zeros(4, dtype=torch.long)), "axis must be a contiguous int32"),
    ],
)
def test_the_kernel_refuses_bad_arguments_itself(overrides, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        _ext(**overrides)
