"""``apply_mrope``: the M-RoPE rotation of q and k, angles computed in-kernel from 3-D (t, h, w) positions.

Reading order: ``reference.py`` (the math, in plain PyTorch: the spec), ``op.py`` (the public
function, its checks, the custom op and its autograd: the backward is the rotation by −θ),
``kernels.py`` (the Triton rotary helpers every kernel of the package shares, and the rotation
kernel), ``launch.py`` (block sizes, the launcher, the ahead-of-time compile specs), ``cpu.py``
(the CPU path).
"""

from .op import apply_mrope
from .reference import apply_mrope_reference

__all__ = ["apply_mrope", "apply_mrope_reference"]
