"""The vision tower's attention on ``mcg_rope_attention``: the 2-D rotary inside packed, non-causal attention.

Stock transformers (every family) turns each patch's (h, w) coordinates into cos/sin tables [T, D]
once per forward (``<V>VisionRotaryEmbedding``) and rotates q and k of every layer with them before
attending within each image (or frame, or window) of the packed sequence:

    f = inv_freq [D/4] (axial),  θ_h = h·f,  θ_w = w·f,  angles [T, D/2] = [θ_h | θ_w]
    x_rot = x·cos + rotate_half(x)·sin,  cos = cos([angles | angles])             (rotate-half, fp32)
    out_seq = softmax(q_rot k_rotᵀ · D^-1/2) v        per sequence of cu_seqlens, no mask, not causal

That is M-RoPE with position rows (t, h, w) = (0, h, w), frequencies [f | f] and contiguous sections
(0, D/4, D/4): the text decoder's fused kernel serves it unchanged, with the angles computed in
registers. Two methods are replaced:

    <V>VisionRotaryEmbedding.forward(x, position_ids [T, 2])  → (position_ids, position_ids): the int64
        (h, w) coordinates in place of (cos, sin). They travel as the stock tables do; Qwen2.5-VL
        reorders them by its window index exactly as it reorders the tables (a row gather), so the
        window layers see each token's own coordinates.
    <V>VisionAttention.forward                                → qkv → mcg_rope_attention(packed,
        causal=False, cu_seqlens of the layer: images/frames, or Qwen2.5-VL's windows) → proj.

No cos/sin table and no rotated copy of q or k is made; the frequencies are the stock rotary's own
(its ``compute_axial_rope_parameters`` on the layer's rope theta and head dim, made once per device). A layer that
receives real (cos, sin) tables
(a caller's own) runs the stock code, and so does a tower whose head_dim the kernel does not take
(served: 64, 72 (Qwen3-VL), 80 (Qwen2-VL, Qwen2.5-VL), 96, 128), fed the stock tables made from the
coordinates.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch

from clinkd_kernels.attention import HEAD_DIMS, mcg_rope_attention


def is_coordinates(position_embeddings) -> bool:
    """Whether ``position_embeddings`` are the patched rotary's (h, w) coordinates, not (cos, sin) tables."""
    return (
        isinstance(position_embeddings, (tuple, list))
        and len(position_embeddings) == 2
        and isinstance(position_embeddings[0], torch.Tensor)
        and not position_embeddings[0].is_floating_point()
        and position_embeddings[0].dim() == 2
        and position_embeddings[0].shape[-1] == 2
    )


def make_vision_rotary_forward(stock_forward):
    """``<V>VisionRotaryEmbedding.forward(x, position_ids [T, 2])`` → ((h, w) [T, 2], the same): no tables."""

    @functools.wraps(stock_forward)
    def forward(self, x, position_ids):
        coords = position_ids.to(device=x.device, dtype=torch.long)
        return coords, coords

    return forward


def stock_tables(coords: torch.Tensor, inv_freq: torch.Tensor, scaling: float):
    """The stock (cos, sin) tables [T, D] fp32 of (h, w) coordinates [T, 2] and axial inv_freq [D/4]:
    angles [θ_h | θ_w], the half repeated, times ``scaling`` (for a tower the kernel does not serve)."""
    angles = (coords[..., None].float() * inv_freq.float()).flatten(1)  # [T, D/2] = [h·f | w·f]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


@functools.lru_cache(maxsize=32)
def _axial_frequencies(rotary_cls, theta: float, head_dim: int, device: torch.device):
    """(inv_freq fp32 [D/4], the kernel's [f | f] fp32 [D/2], attention scaling) on ``device``, by the stock
    rotary's own formula, made once per (family, rope theta, head dim, device), not in every layer."""
    config = types.SimpleNamespace(rope_parameters={"rope_theta": theta}, head_dim=head_dim)
    inv_freq, scaling = rotary_cls.compute_axial_rope_parameters(config)
    f = inv_freq.to(device=device, dtype=torch.float32)
    return f, torch.cat([f, f]), float(scaling)


def served(head_dim: int) -> bool:
    """Whether the fused attention takes this vision head_dim (the 2-D rotary needs a multiple of 4)."""
    return head_dim in HEAD_DIMS and head_dim % 4 == 0


def make_vision_attention_forward(call, wrapped, *, rotary_cls, backend: str | None):
    """``<V>VisionAttention.forward(hidden_states [T, C], cu_seqlens, position_embeddings, max_seqlen)`` on
    the fused kernel when ``position_embeddings`` are coordinates (see the module docstring); a head_dim
    the kernel does not take runs the stock layer on the stock tables made from the coordinates."""
    signature = inspect.signature(wrapped)

    @functools.wraps(wrapped)
    def forward(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        coords = arguments.get("position_embeddings")
        if not is_coordinates(coords):
            return call(self, *args, **kwargs)
        hw = coords[0]
        head_dim = self.qkv.out_features // (3 * self.num_heads)
        inv_freq, kernel_freq, scaling = _axial_frequencies(
            rotary_cls, float(self.config.rope_parameters["rope_theta"]), head_dim, hw.device
        )
        if not served(head_dim):
            arguments = {**arguments, **arguments.pop("kwargs", {})}
            arguments["position_embeddings"] = stock_tables(hw, inv_freq, scaling)
            return call(**arguments)
        hidden_states, cu_seqlens = arguments["hidden_states"], arguments["cu_seqlens"]
        tokens = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(tokens, 3, self.num_heads, head_dim).unbind(1)  # [T, H, D]
        pos = torch.stack([torch.zeros_like(hw[:, 0]), hw[:, 0], hw[:, 1]])  # [3, T]: (0, h, w)
        max_seqlen = arguments.get("max_seqlen")
        out = mcg_rope_attention(
            q,
            k,
            v,
            pos,
            kernel_freq,
            (0, head_dim // 4, head_dim // 4),
            causal=False,
            softmax_scale=self.scaling * scaling**2,
            cu_seqlens=cu_seqlens.to(torch.int32),
            max_seqlen=max_seqlen if isinstance(max_seqlen, int) else None,
            backend=backend,
        )
        return self.proj(out.reshape(tokens, -1))

    return forward
