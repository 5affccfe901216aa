"""Fused distillation loss: temperature KL(teacher ‖ student) + cross-entropy (DESIGN.md §3.4).

* ``kd_loss(student_logits, labels, ...)`` — from logits; dense teacher logits or top-k PseudoLabels.
* ``linear_kd_loss(hidden, weight, labels, ...)`` — fused with the lm_head, chunked over tokens.
* ``clinkd_released_loss`` / ``clinkd_released_linear_loss`` — the released ClinKD trainer's total.
* ``kd_loss_reference`` / ``linear_kd_loss_reference`` — the plain PyTorch spec.
"""

from clinkd_kernels.loss.kd_loss import kd_loss
from clinkd_kernels.loss.linear_kd_loss import linear_kd_loss
from clinkd_kernels.loss.presets import clinkd_released_linear_loss, clinkd_released_loss
from clinkd_kernels.loss.reference import kd_loss_reference, linear_kd_loss_reference

__all__ = ["kd_loss", "linear_kd_loss", "clinkd_released_loss", "clinkd_released_linear_loss",
           "kd_loss_reference", "linear_kd_loss_reference", "aot_specs"]


def aot_specs():
    """Compile configurations of this op's Triton kernels (imports Triton only when asked)."""
    from clinkd_kernels.loss.kernels import aot_specs as specs

    return specs()
