"""The comparison rule every kernel test uses (docs/numerics.md explains it).

An output ``out`` of dtype d is compared with a float64 reference ``ref``. With ``baseline`` being
what plain PyTorch computes in the same dtype d, each element must satisfy

    |out - ref| <= 2 * |baseline - ref| + atol        (the flash-attention rule)

and the whole tensor ``||out - ref|| / ||ref||`` must stay below a per-dtype bound. Non-finite
reference values must be matched exactly (same infinity, NaN where NaN).
"""

from __future__ import annotations

import torch

NORM_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
DEFAULT_ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def assert_close(
    name: str,
    out: torch.Tensor,
    ref: torch.Tensor,
    baseline: torch.Tensor | None = None,
    *,
    atol: float | None = None,
    norm_tol: float | None = None,
    dtype: torch.dtype | None = None,
    norm_floor: float = 0.0,
) -> None:
    """Assert ``out`` matches the float64 ``ref`` under the rule above.

    ``dtype`` (default ``out.dtype``) picks the norm bound and the default ``atol``
    (1e-6 fp32, 1e-3 fp16, 1e-2 bf16). ``norm_floor`` is a lower bound for ``||ref||`` in the norm
    test, for quantities on a known absolute scale that may be near 0 (a probability difference such
    as 1 - sum(p) has an absolute, not a relative, error: pass ``sqrt(numel)``).
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    dtype = dtype or out.dtype
    if atol is None:
        atol = DEFAULT_ATOL.get(dtype, 1e-12)
    if norm_tol is None:
        norm_tol = NORM_TOL.get(dtype, 1e-5)
    o = out.detach().double().cpu()
    r = ref.detach().double().cpu()

    finite = torch.isfinite(r)
    if not bool(finite.all()):
        same = (o == r) | (torch.isnan(o) & torch.isnan(r))
        bad = ~finite & ~same
        assert not bool(bad.any()), (
            f"{name}: non-finite reference values not reproduced at "
            f"{bad.nonzero()[:5].tolist()}: got {o[bad][:5].tolist()}, want {r[bad][:5].tolist()}"
        )
    assert bool(torch.isfinite(o[finite]).all()), f"{name}: non-finite output where the reference is finite"

    err = (o - r).abs()[finite]
    allowed = torch.full_like(err, atol)
    if baseline is not None:
        allowed = allowed + 2 * (baseline.detach().double().cpu() - r).abs()[finite]
    worst = (err - allowed).argmax() if err.numel() else None
    assert err.numel() == 0 or bool((err <= allowed).all()), (
        f"{name}: |out - ref| exceeds the allowed error at {int((err > allowed).sum())} of {err.numel()} elements; "
        f"worst: err {err[worst].item():.3e} > allowed {allowed[worst].item():.3e}"
    )

    rn = max(r[finite].norm().item(), norm_floor)
    if rn > 0:
        rel = (o[finite] - r[finite]).norm() / rn
        assert rel <= norm_tol, f"{name}: relative norm error {rel:.3e} > {norm_tol:.1e} for {dtype}"
