"""``kd_loss``: temperature KL(teacher ‖ student) + cross-entropy from student logits: the public function,
the custom op and the autograd (the checks are ``checks.py``'s, the preamble ``rows.prepare_call``).

The gradient is computed in the same pass as the loss (the row kernel writes it), so backward only
scales it by grad_output. The math is written once, in ``reference.py``; the per-row work is the
Triton kernel (``kernels.py``, launched by ``launch.py``) or the CPU path (``cpu.py``), behind the
row contract of ``rows.py`` (which also makes the reduction coefficients).

    clinkd::kd_loss  (custom op, no autograd of its own: an opaque node for torch.compile)
        → loss, kd, ce, grad [N, V] (the gradient of the loss w.r.t. the logits; [0] when not asked)
    _KDLoss          (the one autograd): forward runs the op, or with ``inplace_grad`` writes the
                     gradient over the logits (eager only); backward scales the saved gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._memory import empty_output
from ..topk import PseudoLabels
from . import checks
from .reference import kd_loss_reference
from .rows import (
    TWICE,
    LossOptions,
    accumulate_dtype,
    assemble,
    coefficients,
    op_signature,
    options_of,
    prepare_call,
    rows_function,
    scale_saved_,
    topk_fields,
    topk_of,
)


class KDArgs(NamedTuple):
    """The arguments of the custom op ``clinkd::kd_loss``, in its schema's order: the one place they are
    written (the op, its fake kernel and its callers read them from here)."""

    student_logits: torch.Tensor  # [N, V]
    labels: torch.Tensor  # [N]
    teacher_logits: torch.Tensor | None  # [N, V_t >= V]
    topk_indices: torch.Tensor | None  # [N, k]
    topk_logprobs: torch.Tensor | None  # [N, k]
    topk_residual: torch.Tensor | None  # [N]
    token_weights: torch.Tensor | None  # [N]
    temperature: float
    alpha: float
    beta: float
    ignore_index: int
    reduction: str
    t2_scale: bool
    compute_grad: bool
    backend: str

    @classmethod
    def of(cls, z, labels, teacher_logits, topk, token_weights, o: LossOptions, *, compute_grad: bool) -> KDArgs:
        """The op's arguments from the row functions' form (``topk`` a triple or None) and the options."""
        indices, logprobs, residual = topk if topk is not None else (None, None, None)
        return cls(
            z,
            labels,
            teacher_logits,
            indices,
            logprobs,
            residual,
            token_weights,
            o.temperature,
            o.alpha,
            o.beta,
            o.ignore_index,
            o.reduction,
            o.t2_scale,
            compute_grad,
            o.backend,
        )

    options = property(options_of)
    topk = property(topk_of)


def _forward(z, labels, teacher_logits, topk, token_weights, o: LossOptions, grad):
    """(loss, kd, ce) of logits z [N, V]; writes the gradient into ``grad`` ([N, V], may be z) unless None."""
    n, vocab = z.shape
    checks.check_values(labels, vocab, o.ignore_index, token_weights, topk, teacher_logits, student_logits=z)
    acc = accumulate_dtype(z)
    coef_kd, coef_ce, kd_scale, ce_scale = coefficients(
        labels,
        token_weights,
        ignore_index=o.ignore_index,
        temperature=o.temperature,
        alpha=o.alpha,
        beta=o.beta,
        reduction=o.reduction,
        t2_scale=o.t2_scale,
        dtype=acc,
    )
    kd_rows = empty_output((n,), dtype=acc, device=z.device)
    ce_rows = empty_output((n,), dtype=acc, device=z.device)
    rows_function(o.backend)(
        z,
        labels,
        teacher_logits=teacher_logits,
        topk=topk,
        inv_t=1.0 / o.temperature,
        ignore_index=o.ignore_index,
        coef_kd=coef_kd,
        coef_ce=coef_ce,
        kd_out=kd_rows,
        ce_out=ce_rows,
        grad_out=grad,
    )
    return assemble(kd_rows, ce_rows, kd_scale, ce_scale, alpha=o.alpha, beta=o.beta, reduction=o.reduction)


def _kd_loss_impl(*args):
    """(loss, kd, ce, grad_logits); grad_logits is [N, V] in the logits' dtype (or [0] without compute_grad),
    the gradient of the loss (per row for "none") w.r.t. student_logits."""
    a = KDArgs(*args)
    z = a.student_logits
    grad = empty_output(z.shape, dtype=z.dtype, device=z.device) if a.compute_grad else z.new_empty(0)
    loss, kd, ce = _forward(
        z, a.labels, a.teacher_logits, a.topk, a.token_weights, a.options, grad if a.compute_grad else None
    )
    return loss, kd, ce, grad


_kd_loss_impl.__signature__ = op_signature(KDArgs, returns=tuple[(torch.Tensor,) * 4])
_kd_loss_op = torch.library.custom_op("clinkd::kd_loss", _kd_loss_impl, mutates_args=())


@_kd_loss_op.register_fake
def _(*args):
    a = KDArgs(*args)
    z = a.student_logits
    shape = (z.shape[0],) if a.reduction == "none" else ()
    loss, kd, ce = (z.new_empty(shape, dtype=accumulate_dtype(z)) for _ in range(3))
    return loss, kd, ce, z.new_empty(z.shape if a.compute_grad else (0,))


class _KDLoss(torch.autograd.Function):
    """d loss / d student_logits is made in forward; backward multiplies it by grad_output (per row for
    "none"), in place: a copy would double the [N, V] buffer. One backward per forward."""

    @staticmethod
    def forward(
        ctx,
        student_logits,
        labels,
        teacher_logits,
        topk_indices,
        topk_logprobs,
        topk_residual,
        token_weights,
        options: LossOptions,
        inplace: bool,
    ):
        topk = topk_fields(topk_indices, topk_logprobs, topk_residual)
        if inplace:
            loss, kd, ce = _forward(
                student_logits, labels, teacher_logits, topk, token_weights, options, grad=student_logits
            )
            # Anything autograd saved that still points at these logits is stale now: using it must fail.
            torch.autograd.graph.increment_version(student_logits)
            ctx.inplace_grad = student_logits  # not saved: its version moved on purpose
        else:
            loss, kd, ce, grad = _kd_loss_op(
                *KDArgs.of(student_logits, labels, teacher_logits, topk, token_weights, options, compute_grad=True)
            )
            ctx.save_for_backward(grad)
            ctx.inplace_grad = None
        ctx.reduction = options.reduction
        ctx.mark_non_differentiable(kd, ce)
        ctx.set_materialize_grads(False)  # else backward gets [N, V] zeros for the components' grads
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        no_grads = (None,) * 8  # labels, teachers, token weights, options, inplace
        if grad_loss is None:
            return (None,) + no_grads
        if getattr(ctx, "scaled", False):
            raise RuntimeError(f"kd_loss: {TWICE}")
        ctx.scaled = True
        grad = ctx.inplace_grad if ctx.inplace_grad is not None else ctx.saved_tensors[0]
        ctx.inplace_grad = None
        g = grad_loss.to(grad.dtype)
        return (scale_saved_(grad, g.unsqueeze(1) if ctx.reduction == "none" else g),) + no_grads


def kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_logits: torch.Tensor | None = None,
    teacher: PseudoLabels | None = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 1.0,
    ignore_index: int = -100,
    token_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    t2_scale: bool = False,
    return_components: bool = False,
    inplace_grad: bool = False,
    backend: str | None = None,
):
    """Distillation loss (α·KD + β·CE)/(α + β) of student logits against a dense or top-k teacher.

    Args:
        student_logits: [N, V] fp32/fp16/bf16 (fp64 on the "cpu"/"portable"/"torch" backends). ``-inf`` entries
            are allowed (masked vocabulary) as long as each valid row has a finite one; a valid row
            holding NaN or ``+inf``, or entirely ``-inf``, has no distribution: ValueError naming the rows.
        labels: [N] int64/int32 targets (already shifted by the caller); ``ignore_index`` marks rows
            that are not valid (no loss, zero gradient).
        teacher_logits: dense teacher [N, V_t], V_t >= V; columns beyond V are dropped before the softmax.
        teacher: sparse ``PseudoLabels`` [N, k] (indices, logprobs extracted at this temperature, residual).
            Give exactly one of the two teachers (or neither with alpha=0: cross-entropy alone).
        temperature: T > 0 for the KD softmaxes (the cross-entropy is at T = 1).
        alpha, beta: weights of KD and CE, >= 0, not both 0; beta=0 is KD alone.
        token_weights: [N] >= 0, weighting KD_i (not CE).
        reduction: "mean" | "sum" | "none" (per row, [N]); the formulas are in ``reference.py``.
        t2_scale: multiply the KD term by T².
        return_components: also return the KD and CE parts (same reduction, no gradient) at no extra cost.
        inplace_grad: write the gradient over ``student_logits`` during forward instead of a new [N, V]
            buffer (saves one [N, V] tensor). ``student_logits`` then holds the gradient and must not be
            used again; autograd raises if another op saved it for backward. Needs a contiguous tensor
            and eager mode (not torch.compile).
        backend: "triton" | "cpu" (C++ rows) | "portable" (chunked PyTorch rows, any device) | "torch" (the
            reference) (default: triton on CUDA, cpu on CPU; or CLINKD_BACKEND).

    Returns:
        loss ([] fp32, or [N] for "none"), or (loss, kd, ce) with ``return_components``. Gradients flow
        to student_logits only; the gradient is made in forward and scaled in place by backward, so one
        backward per forward (a second one through the same graph raises).
    """
    checks.check_logits("student_logits", student_logits)
    n, vocab = student_logits.shape

    def check_own():
        if teacher_logits is not None:
            checks.check_logits(
                "teacher_logits",
                teacher_logits,
                n_rows=n,
                student_vocab=vocab,
                ref_name="student_logits",
                ref=student_logits,
            )

    options = prepare_call(
        "kd_loss",
        "student_logits",
        student_logits,
        vocab=vocab,
        labels=labels,
        token_weights=token_weights,
        teacher=teacher,
        has_dense=teacher_logits is not None,
        check_own=check_own,
        temperature=temperature,
        alpha=alpha,
        beta=beta,
        ignore_index=ignore_index,
        reduction=reduction,
        t2_scale=t2_scale,
        backend=backend,
    )
    topk = None if teacher is None else (teacher.indices, teacher.logprobs, teacher.residual)
    if options.backend == "torch":
        if inplace_grad:
            raise ValueError("inplace_grad needs the 'triton', 'cpu' or 'portable' backend, not 'torch'")
        checks.check_values(
            labels, vocab, ignore_index, token_weights, topk, teacher_logits, student_logits=student_logits
        )
        o = options
        return kd_loss_reference(
            student_logits,
            labels,
            teacher_logits=teacher_logits,
            teacher=teacher,
            temperature=o.temperature,
            alpha=o.alpha,
            beta=o.beta,
            ignore_index=ignore_index,
            token_weights=token_weights,
            reduction=reduction,
            t2_scale=t2_scale,
            return_components=return_components,
        )

    # The kernels read rows with unit column stride.
    unit = lambda t: t if t is None or t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    z, t = unit(student_logits), unit(teacher_logits)
    if not (student_logits.requires_grad and torch.is_grad_enabled()):
        loss, kd, ce, _ = _kd_loss_op(*KDArgs.of(z, labels, t, topk, token_weights, options, compute_grad=False))
    else:
        if inplace_grad and not student_logits.is_contiguous():
            raise ValueError("inplace_grad needs contiguous student_logits (the gradient is written over them)")
        if inplace_grad and torch.compiler.is_compiling():
            raise RuntimeError("inplace_grad is eager-only; use inplace_grad=False under torch.compile")
        loss, kd, ce = _KDLoss.apply(
            z, labels, t, *(topk or (None, None, None)), token_weights, options, bool(inplace_grad)
        )
    return (loss, kd, ce) if return_components else loss
