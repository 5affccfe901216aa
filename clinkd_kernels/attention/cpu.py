"""CPU path (backend ``"cpu"``): rotation, then ``torch.nn.functional.scaled_dot_product_attention``.

The rotation is ``apply_mrope``'s CPU path (fp32 angles, token-chunked, no [B,S,D] cos/sin tables);
float64 inputs, which it does not take, use the reference rotation.

Padded form: one SDPA call with a boolean [B,1,S,S] mask (key padding ∧ causal); rows left without
any key (padded queries under left padding) are given every key so SDPA stays finite, and zeroed
after. Packed form: one SDPA call per sequence (no cross-sequence attention, no [T,T] mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rope import apply_mrope, apply_mrope_reference


def _rotate(q, k, position_ids, inv_freq, mrope_section, interleaved):
    """q [..., Hq, D], k [..., Hkv, D] rotated by position_ids [3, ...]: apply_mrope's CPU path (the
    reference for float64)."""
    if q.dtype == torch.float64:
        return apply_mrope_reference(q, k, position_ids, inv_freq, mrope_section, mrope_interleaved=interleaved)
    return apply_mrope(
        q, k, position_ids, inv_freq.float(), mrope_section, mrope_interleaved=interleaved, backend="cpu"
    )


def _sdpa(q, k, v, *, mask, causal, scale):
    """q [B,S,Hq,D], k/v [B,S,Hkv,D] (rotated) → [B,S,Hq,D]."""
    gqa = q.shape[2] != k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale, enable_gqa=gqa
    )
    return out.transpose(1, 2)


def mcg_rope_attention_cpu(
    q, k, v, position_ids, inv_freq, mrope_section, interleaved, *, causal, scale, attention_mask, cu_seqlens
):
    """Same contract as ``mcg_rope_attention_reference``; ``scale`` is already resolved."""
    q_rot, k_rot = _rotate(q, k, position_ids, inv_freq, mrope_section, interleaved)
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        out = [
            _sdpa(q_rot[None, lo:hi], k_rot[None, lo:hi], v[None, lo:hi], mask=None, causal=causal, scale=scale)[0]
            for lo, hi in zip(bounds[:-1], bounds[1:])
            if hi > lo
        ]
        return torch.cat(out, dim=0) if out else q * 0  # no tokens at all (q * 0 keeps autograd)
    if attention_mask is None:
        return _sdpa(q_rot, k_rot, v, mask=None, causal=causal, scale=scale)
    s = q.shape[1]
    keep = attention_mask.bool()
    allowed = keep[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    has_key = allowed.any(-1, keepdim=True)
    out = _sdpa(q_rot, k_rot, v, mask=allowed | ~has_key, causal=causal, scale=scale)
    row_ok = keep[:, :, None, None] & has_key[:, 0, :, :, None]  # [B, S, 1, 1]
    return out * row_ok.to(out.dtype)
