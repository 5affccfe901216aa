"""``apply_mrope``: the M-RoPE rotation of q and k, angles computed in-kernel from 3-D (t, h, w) positions.

Reading order: ``reference.py`` (the math, in plain PyTorch: the spec), ``op.py`` (the public
function, the custom op and its autograd: the backward is the rotation by −θ), ``checks.py`` (the
argument checks), ``layout.py`` (the frequency layout as an int32 axis vector, and
``check_mrope_section``, the sections' rule every kernel-side validator applies), ``kernels.py``
(the Triton rotary helpers every kernel of the package shares, and the rotation kernel),
``launch.py`` (block sizes, the launcher, the ahead-of-time compile specs), ``cpu.py`` (the CPU path).
"""

from .layout import check_mrope_section
from .op import apply_mrope
from .reference import apply_mrope_reference

__all__ = ["apply_mrope", "apply_mrope_reference", "check_mrope_section"]
