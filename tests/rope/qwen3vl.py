"""transformers' Qwen3-VL rotary recipe, written from its source (models/qwen3_vl/modeling_qwen3_vl.py), not
from clinkd's reference.py: the reference of the interleaved M-RoPE tests (tests/rope/test_interleaved.py
pins it to the installed transformers module; tests/attention/test_interleaved.py builds attention on it)."""

from __future__ import annotations

import torch


def qwen3vl_recompose(freq: torch.Tensor, mrope_section) -> torch.Tensor:
    """``Qwen3VLTextRotaryEmbedding.recomposition_frequencies``: freq [3, ..., D/2] → [..., D]."""
    freqs_thw = freq[0].clone()  # start from the t row
    for dim, offset in enumerate((1, 2), start=1):  # h, w
        length = mrope_section[dim] * 3
        idx = slice(offset, length, 3)
        freqs_thw[..., idx] = freq[dim, ..., idx]
    return torch.cat((freqs_thw, freqs_thw), dim=-1)


def qwen3vl_rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def qwen3vl_cos_sin(position_ids, inv_freq, mrope_section, *, attention_scaling=1.0, compute=torch.float64):
    """cos, sin [*tokens, D] in ``compute`` from position_ids [3, *tokens]; θ is the fp32 product."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # [3, *tokens, D/2] fp32
    cos = freqs.to(compute).cos() * attention_scaling
    sin = freqs.to(compute).sin() * attention_scaling
    return qwen3vl_recompose(cos, mrope_section), qwen3vl_recompose(sin, mrope_section)


def qwen3vl_rotary(q, k, position_ids, inv_freq, mrope_section, *, attention_scaling=1.0, compute=torch.float64):
    """q [*tokens, Hq, D], k [*tokens, Hkv, D], position_ids [3, *tokens] → rotated (q, k) in the inputs'
    dtype, computed in ``compute`` (float64: the reference; float32: the same-dtype baseline)."""
    cos, sin = qwen3vl_cos_sin(
        position_ids, inv_freq, mrope_section, attention_scaling=attention_scaling, compute=compute
    )
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # apply_rotary_pos_emb(unsqueeze_dim=-2)
    qc, kc = q.to(compute), k.to(compute)
    q_embed = (qc * cos) + (qwen3vl_rotate_half(qc) * sin)
    k_embed = (kc * cos) + (qwen3vl_rotate_half(kc) * sin)
    return q_embed.to(q.dtype), k_embed.to(k.dtype)


def inv_freq_for(D, base=5_000_000.0):
    """Qwen3-VL's default rope (rope_theta 5e6): 1 / base^(2i/D) in fp32, as transformers computes it."""
    return 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float) / D))
