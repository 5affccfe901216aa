"""Fused MCG-RoPE FlashAttention (DESIGN.md §3.3): rotation in registers, forward and backward, padded and packed."""

from .launch import aot_specs
from .op import mcg_rope_attention
from .reference import mcg_rope_attention_reference

__all__ = ["aot_specs", "mcg_rope_attention", "mcg_rope_attention_reference"]
