"""The rotary helpers every Triton kernel shares: the in-kernel sin/cos against float64."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from clinkd_kernels.rope.kernels import sincos


@triton.jit
def _sincos_kernel(X, C, S, N: tl.constexpr):
    o = tl.arange(0, N)
    c, s = sincos(tl.load(X + o))
    tl.store(C + o, c)
    tl.store(S + o, s)


def test_sincos_matches_float64(interpreter):
    """cos/sin of fp32 angles, negative ones and near multiples of π/2 included, over the range positions
    reach (θ = position · inv_freq with inv_freq ≤ 1), against float64 cos/sin of the same fp32 angle."""
    n = 4096
    for limit, tol in ((4.0, 2e-7), (1e3, 2e-7), (1e4, 2e-7), (1e5, 2e-7), (1.5e6, 2e-7), (3e6, 6e-7)):
        x = ((torch.rand(n, dtype=torch.float64) * 2 - 1) * limit).float()
        turns = torch.randint(-int(limit / 1.6), int(limit / 1.6) + 1, (256,), dtype=torch.float64)
        x[:256] = (turns * torch.pi / 2).float()  # the quadrant edges, where the reduction is hardest
        x = x.to(interpreter)
        c, s = torch.empty_like(x), torch.empty_like(x)
        _sincos_kernel[(1,)](x, c, s, N=n)
        x64 = x.double()
        assert (c.double() - x64.cos()).abs().max() < tol, f"cos error too large for |θ| < {limit}"
        assert (s.double() - x64.sin()).abs().max() < tol, f"sin error too large for |θ| < {limit}"
