"""MCG-RoPE position indices: 3-D (t, h, w) positions with a modality gap λ and a vision stride α.

* ``mcg_rope_index``: position ids [3,B,S] and rope deltas [B,1] of a batch of token sequences.
* ``mrope_decode_position_ids``: the position ids of tokens generated after a prefill.

Reading order: ``reference.py`` (one row and one token at a time: the spec), ``op.py`` (the public
functions, the custom op), ``checks.py`` (the argument checks, and the grid and interval checks both
paths share), ``cpu.py`` (the NumPy path of CPU tensors), ``device.py`` (the tensor-op path of tensors
on their device: CUDA). No Triton kernel: the op moves a few bytes per token and is bound by the
number of launches, which whole-batch tensor ops keep small; so no ``kernels.py`` / ``launch.py``.
"""

from .op import mcg_rope_index, mrope_decode_position_ids
from .reference import mcg_rope_index_reference

__all__ = ["mcg_rope_index", "mcg_rope_index_reference", "mrope_decode_position_ids"]
