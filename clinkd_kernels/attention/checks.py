"""Argument checks of ``mcg_rope_attention``: shapes, dtypes and devices before any work (``check_inputs``),
and the checks that read tensor values (``check_values``: q, k, v finite, cu_seqlens' order and ends; inside
the Triton path's custom op so that tracing needs no data-dependent Python).

Every error names the argument, what was expected and what was given. The sections' rule is
``clinkd_kernels.rope.layout.check_mrope_section`` (shared with ``apply_mrope``).
"""

from __future__ import annotations

import math

import torch

from .._validation import FLOAT_DTYPES, check_int, check_positive_float, check_same_device, check_shape, check_tensor
from ..rope.layout import check_mrope_section

HEAD_DIMS = (64, 72, 80, 96, 128)  # 72: Qwen3-VL's vision tower (half tile padded 36 → 64)
_INT_DTYPES = (torch.int32, torch.int64)
_QKV_DTYPES = FLOAT_DTYPES + (torch.float64,)  # float64: "cpu" and "torch" backends only
_MASK_DTYPES = (torch.bool, torch.int8, torch.uint8, torch.int32, torch.int64)


def check_inputs(
    q,
    k,
    v,
    position_ids,
    inv_freq,
    mrope_section,
    mrope_interleaved,
    causal,
    softmax_scale,
    attention_mask,
    cu_seqlens,
    max_seqlen,
) -> tuple[tuple[int, int, int], float]:
    """Shape/dtype/device checks of ``mcg_rope_attention``'s arguments (no tensor values read).

    Padded form: q [B,S,Hq,D], k/v [B,S,Hkv,D], position_ids [3,B,S], attention_mask [B,S] or None.
    Packed form: q [T,Hq,D], k/v [T,Hkv,D], position_ids [3,T], cu_seqlens int32 [B+1].
    Returns (the sections as ints, the softmax scale).
    """
    check_tensor("q", q, ndim=(3, 4), dtypes=_QKV_DTYPES)
    check_tensor("k", k, ndim=q.dim(), dtypes=_QKV_DTYPES)
    check_tensor("v", v, ndim=q.dim(), dtypes=_QKV_DTYPES)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"q, k and v must have the same head dim, got q {d}, k {k.shape[-1]}, v {v.shape[-1]}")
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim (q.shape[-1]) must be one of {HEAD_DIMS}, got {d}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {list(k.shape)} and v {list(v.shape)}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the number of query heads must be a multiple of the KV heads, got Hq={hq}, Hkv={hkv}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else check_positive_float("softmax_scale", softmax_scale)

    check_tensor("position_ids", position_ids, dtypes=_INT_DTYPES)
    if q.dim() == 4:
        b, s = q.shape[:2]
        check_shape("k", k, [b, s, hkv, d])
        check_shape("position_ids", position_ids, [3, b, s])
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens is for the packed form (3-D q [T,Hq,D]); q is 4-D [B,S,Hq,D]")
        if max_seqlen is not None:
            raise ValueError("max_seqlen is for the packed form (3-D q [T,Hq,D]); q is 4-D [B,S,Hq,D]")
        if attention_mask is not None:
            check_tensor("attention_mask", attention_mask, dtypes=_MASK_DTYPES)
            check_shape("attention_mask", attention_mask, [b, s])
    else:
        t = q.shape[0]
        check_shape("k", k, [t, hkv, d])
        check_shape("position_ids", position_ids, [3, t])
        if attention_mask is not None:
            raise ValueError(
                "attention_mask is for the padded form (4-D q [B,S,Hq,D]); packed sequences "
                "are described by cu_seqlens alone"
            )
        if cu_seqlens is None:
            raise ValueError("3-D q [T,Hq,D] is the packed form and needs cu_seqlens (int32 [B+1])")
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
        if cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must have at least 2 entries [0, ..., T], got {cu_seqlens.shape[0]}")
        if max_seqlen is not None:
            check_int("max_seqlen", max_seqlen, low=1)

    check_tensor("inv_freq", inv_freq, ndim=1, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_shape("inv_freq", inv_freq, [d // 2])
    section = check_mrope_section(mrope_section, d // 2, mrope_interleaved)
    check_same_device(
        q=q,
        k=k,
        v=v,
        position_ids=position_ids,
        inv_freq=inv_freq,
        attention_mask=attention_mask,
        cu_seqlens=cu_seqlens,
    )
    return section, scale


def _where_not_finite(name: str, x: torch.Tensor, seqlen: int) -> str:
    """The error of a tensor ``x`` [B,S,H,D] / [T,H,D] (flat [B·S,H,D] when ``seqlen`` > 0) holding NaN or
    ±inf: how many (token, head) rows, and the first few by batch, position and head (or token and head)."""
    bad = ~torch.isfinite(x).all(-1)  # [..., H]
    count = int(bad.sum())
    rows = bad.nonzero()[:5].tolist()
    if x.dim() == 4:
        where = [f"(batch {b}, position {s}, head {h})" for b, s, h in rows]
    elif seqlen > 0:
        where = [f"(batch {t // seqlen}, position {t % seqlen}, head {h})" for t, h in rows]
    else:
        where = [f"(token {t}, head {h})" for t, h in rows]
    more = f" and {count - len(rows)} more" if count > len(rows) else ""
    return (
        f"{name} must be finite (attention of NaN or ±inf inputs is NaN): {count} (token, head) rows hold "
        f"NaN or ±inf, at {', '.join(where)}{more}"
    )


def check_values(q, k, v, cu_seqlens, max_seqlen: int | None, seqlen: int = 0) -> int | None:
    """Checks that read tensor values, in one host sync: q [..., Hq, D], k/v [..., Hkv, D] hold no NaN or
    ±inf (refused by name, token and head), and cu_seqlens (int32 [B+1], packed form) starts at 0, ends
    at T = q.shape[0] and does not decrease. ``seqlen`` > 0: q, k, v are the padded form's flat
    [B·S, H, D] views (for the error's batch and position). Returns the longest packed sequence (None
    for the padded form, ``cu_seqlens`` None)."""
    finite = torch.stack([torch.isfinite(x).all() for x in (q, k, v)])
    if cu_seqlens is None:
        flags, cu = finite.tolist(), None
    else:
        both = torch.cat([finite.to(cu_seqlens.dtype), cu_seqlens]).tolist()
        flags, cu = both[:3], both[3:]
    for name, x, ok in zip(("q", "k", "v"), (q, k, v), flags):
        if not ok:
            raise ValueError(_where_not_finite(name, x, seqlen))
    if cu is None:
        return None
    n_tokens = q.shape[0]
    if cu[0] != 0 or cu[-1] != n_tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at T = {n_tokens}, got {cu[0]} ... {cu[-1]}")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    bad = [i for i, n in enumerate(lengths) if n < 0]
    if bad:
        raise ValueError(f"cu_seqlens must be non-decreasing, but it decreases after entries {bad[:5]}: {cu[:12]}")
    longest = max(lengths)
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest packed sequence ({longest})")
    return longest
