"""Argument checks of ``apply_mrope``: shapes, dtypes, devices and the sections, before any work.

Every error names the argument, what was expected and what was given. The sections' rule is
``layout.check_mrope_section`` (shared with the fused attention).
"""

from __future__ import annotations

import torch

from .._validation import FLOAT_DTYPES, check_positive_float, check_same_device, check_tensor
from .layout import check_mrope_section


def check_inputs(
    q, k, position_ids, inv_freq, mrope_section, attention_scaling, mrope_interleaved
) -> tuple[tuple[int, int, int], float]:
    """Shapes, dtypes and devices of ``apply_mrope``'s arguments (no tensor values read).

    q [B,S,Hq,D] and k [B,S,Hkv,D] (or packed [T,Hq,D], [T,Hkv,D]) of one float dtype, D even in [2, 256];
    position_ids int [3,B,S] (or [3,T]); inv_freq fp32 [D/2]. Returns (the sections as ints, the scale).
    """
    check_tensor("q", q, ndim=(3, 4), dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=(3, 4), dtypes=FLOAT_DTYPES)
    if k.dim() != q.dim():
        raise ValueError(
            f"q and k must both be 4-D [B,S,H,D] or both 3-D [T,H,D]; got q {list(q.shape)}, k {list(k.shape)}"
        )
    if k.dtype != q.dtype:
        raise TypeError(f"q and k must have one dtype, got q {q.dtype} and k {k.dtype}")
    tokens = q.shape[:-2]
    if k.shape[:-2] != tokens:
        what = "batch and sequence" if q.dim() == 4 else "token"
        raise ValueError(f"q and k must agree on the {what} dims: q {list(q.shape)}, k {list(k.shape)}")
    D = q.shape[-1]
    if k.shape[-1] != D:
        raise ValueError(f"q and k must have the same head dim: q has {D}, k has {k.shape[-1]}")
    if D % 2 or not 2 <= D <= 256:
        raise ValueError(f"head dim must be even and in [2, 256], got {D}")
    check_tensor("position_ids", position_ids, dtypes=(torch.int64, torch.int32))
    want = [3, *tokens]
    if list(position_ids.shape) != want:
        raise ValueError(
            f"position_ids must have shape {want} (3 rows t, h, w over the tokens of q), got {list(position_ids.shape)}"
        )
    check_tensor("inv_freq", inv_freq, ndim=1, dtypes=(torch.float32,))
    if inv_freq.shape[0] != D // 2:
        raise ValueError(f"inv_freq must have shape [{D // 2}] (D/2), got {list(inv_freq.shape)}")
    section = check_mrope_section(mrope_section, D // 2, mrope_interleaved)
    check_same_device(q=q, k=k, position_ids=position_ids, inv_freq=inv_freq)
    return section, check_positive_float("attention_scaling", attention_scaling)
