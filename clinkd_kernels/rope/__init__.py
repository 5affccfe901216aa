"""Rotary position embedding for Qwen2-VL style 3-D (t, h, w) positions.

* ``mcg_rope_index``: MCG-RoPE position ids (modality gap λ, vision stride α) and rope deltas.
* ``mrope_decode_position_ids``: position ids of tokens generated after the prefill.
* ``apply_mrope``: rotate q and k by M-RoPE angles computed in-kernel from the position ids.
"""

from .apply import apply_mrope
from .index import mcg_rope_index, mrope_decode_position_ids

__all__ = ["apply_mrope", "mcg_rope_index", "mrope_decode_position_ids"]
