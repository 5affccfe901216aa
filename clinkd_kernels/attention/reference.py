"""Plain PyTorch reference of MCG-RoPE attention (backend ``"torch"``): the spec the kernels are tested against.

    q_rot, k_rot = apply_mrope_reference(q, k, position_ids, inv_freq, mrope_section, mrope_interleaved=interleaved)
    S_ij  = scale · q_rot,i · k_rot,j                 (k, v repeated over the Hq/Hkv query heads of a group)
    S_ij  = −inf  where j is padding, or j > i when causal, or i, j are in different packed sequences
    out_i = softmax_j(S_i) · V                        (0 for padded query rows and rows with no key left)

Computed in the inputs' dtype like transformers' eager attention (rotation and softmax in fp32 for
fp16/bf16, matmuls in the input dtype); pass float64 tensors for a float64 reference. Written for
clarity: it materialises the [B, H, S, S] scores.
"""

from __future__ import annotations

import math

import torch

from ..rope.reference import apply_mrope_reference


def _padded_attention(
    q, k, v, position_ids, inv_freq, mrope_section, *, causal, scale, attention_mask, interleaved=False
):
    """q [B,S,Hq,D], k/v [B,S,Hkv,D], position_ids [3,B,S], attention_mask [B,S] or None → [B,S,Hq,D]."""
    b, s, hq, _ = q.shape
    group = hq // k.shape[2]
    q_rot, k_rot = apply_mrope_reference(q, k, position_ids, inv_freq, mrope_section, mrope_interleaved=interleaved)
    k_rot = k_rot.repeat_interleave(group, dim=2)
    v_rep = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q_rot, k_rot) * scale  # [B, Hq, S, S]

    allowed = torch.ones(b, 1, s, s, dtype=torch.bool, device=q.device)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    # Rows with no allowed key would be NaN after softmax (and in its backward): let them see every
    # key, then zero them.
    has_key = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~(allowed | ~has_key), float("-inf"))
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    probs = torch.softmax(scores.to(compute), dim=-1).to(q.dtype) * has_key
    out = torch.einsum("bhij,bjhd->bihd", probs, v_rep)
    if attention_mask is not None:
        out = out * attention_mask.to(out.dtype)[:, :, None, None]
    return out


def mcg_rope_attention_reference(
    q,
    k,
    v,
    position_ids,
    inv_freq,
    mrope_section,
    *,
    mrope_interleaved: bool = False,
    causal: bool = True,
    softmax_scale: float | None = None,
    attention_mask=None,
    cu_seqlens=None,
):
    """Padded form: q [B,S,Hq,D], k/v [B,S,Hkv,D], position_ids [3,B,S], attention_mask [B,S] → [B,S,Hq,D].
    Packed form: q [T,Hq,D], k/v [T,Hkv,D], position_ids [3,T], cu_seqlens [B+1] → [T,Hq,D]
    (each sequence attended on its own)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if cu_seqlens is None:
        return _padded_attention(
            q,
            k,
            v,
            position_ids,
            inv_freq,
            mrope_section,
            causal=causal,
            scale=scale,
            attention_mask=attention_mask,
            interleaved=mrope_interleaved,
        )
    outs = []
    bounds = cu_seqlens.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        outs.append(
            _padded_attention(
                q[None, lo:hi],
                k[None, lo:hi],
                v[None, lo:hi],
                position_ids[:, None, lo:hi],
                inv_freq,
                mrope_section,
                causal=causal,
                scale=scale,
                attention_mask=None,
                interleaved=mrope_interleaved,
            )[0]
        )
    return torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)
