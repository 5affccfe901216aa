"""The distillation loss: temperature KL(teacher ‖ student) + cross-entropy, dense teacher or top-k
pseudo-labels, from logits (``kd_loss``) or fused with the lm_head (``linear_kd_loss``: no [N, V] logits).

Reading order: ``reference.py`` (the math and every reduction, in plain PyTorch: the spec),
``rows.py`` (what both ops share: the preamble of argument checks, backend and options, the per-row
contract with its reduction coefficients and the row function of each backend, the custom ops'
signatures), ``checks.py`` (the argument checks), ``op.py`` (``kd_loss``: public function, custom op,
autograd), ``linear_op.py`` (``linear_kd_loss``: the chunk loop over the lm_head, its custom ops and
autograd), ``kernels.py`` (the Triton row kernel: both softmax passes and the gradient),
``launch.py`` (its launcher and ahead-of-time compile specs), ``cpu.py`` (the CPU rows: the C++ kernel of
csrc/loss/), ``portable.py`` (the rows in PyTorch, any device).
"""

from .linear_op import linear_kd_loss
from .op import kd_loss
from .reference import kd_loss_reference, linear_kd_loss_reference

__all__ = ["kd_loss", "kd_loss_reference", "linear_kd_loss", "linear_kd_loss_reference"]
