"""``kd_loss``: temperature KL(teacher ‖ student) + cross-entropy from student logits, with the gradient
computed in the same pass (so backward only scales it by grad_output).

Definition: DESIGN.md §3.4 and ``reference.py``. Per-row work: ``kernels.py`` (Triton) or
``rows_torch.py`` (the "cpu" backend, row blocks of bounded size); reductions: ``_common.py``.
"""

from __future__ import annotations

import torch

from clinkd_kernels._dispatch import empty_output, resolve_backend
from clinkd_kernels._validation import check_same_device, check_shape, check_tensor
from clinkd_kernels.loss import _common as C
from clinkd_kernels.loss.reference import kd_loss_reference
from clinkd_kernels.loss.rows_torch import kd_rows_torch
from clinkd_kernels.topk.pseudo_labels import PseudoLabels

BACKENDS = ("triton", "cpu", "torch")


def rows_impl(backend: str):
    """The per-row function of a backend (same signature for both)."""
    if backend == "triton":
        from clinkd_kernels.loss.kernels import kd_rows_triton

        return kd_rows_triton
    return kd_rows_torch


def _forward(z, labels, teacher_logits, topk_indices, topk_logprobs, topk_residual, token_weights, temperature,
             alpha, beta, ignore_index, reduction, t2_scale, grad, backend):
    """Shared body of the custom op and the in-place path. ``grad``: tensor to write the gradient into, or None."""
    n, vocab = z.shape
    topk = None if topk_indices is None else (topk_indices, topk_logprobs, topk_residual)
    C.check_values(labels, vocab, ignore_index, token_weights, topk)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    coef_kd, coef_ce, kd_scale, ce_scale = C.coefficients(
        labels, token_weights, ignore_index=ignore_index, temperature=temperature, alpha=alpha, beta=beta,
        reduction=reduction, t2_scale=t2_scale, dtype=acc)
    kd_rows = empty_output((n,), dtype=acc, device=z.device)
    ce_rows = empty_output((n,), dtype=acc, device=z.device)
    rows_impl(backend)(z, labels, teacher_logits=teacher_logits, topk=topk, inv_t=1.0 / temperature,
                       ignore_index=ignore_index, coef_kd=coef_kd, coef_ce=coef_ce, kd_out=kd_rows, ce_out=ce_rows,
                       grad_out=grad)
    return C.assemble(kd_rows, ce_rows, kd_scale, ce_scale, alpha=alpha, beta=beta, reduction=reduction)


@torch.library.custom_op("clinkd::kd_loss", mutates_args=())
def _kd_loss_op(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                topk_indices: torch.Tensor | None, topk_logprobs: torch.Tensor | None,
                topk_residual: torch.Tensor | None, token_weights: torch.Tensor | None, temperature: float,
                alpha: float, beta: float, ignore_index: int, reduction: str, t2_scale: bool, compute_grad: bool,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kd, ce, grad_logits); grad_logits is [N, V] in the logits' dtype (or [0] without compute_grad),
    the gradient of the loss (per row for "none") w.r.t. student_logits."""
    grad = (empty_output(student_logits.shape, dtype=student_logits.dtype, device=student_logits.device)
            if compute_grad else student_logits.new_empty(0))
    loss, kd, ce = _forward(student_logits, labels, teacher_logits, topk_indices, topk_logprobs, topk_residual,
                            token_weights, temperature, alpha, beta, ignore_index, reduction, t2_scale,
                            grad if compute_grad else None, backend)
    return loss, kd, ce, grad


@_kd_loss_op.register_fake
def _(student_logits, labels, teacher_logits, topk_indices, topk_logprobs, topk_residual, token_weights,
      temperature, alpha, beta, ignore_index, reduction, t2_scale, compute_grad, backend):
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    shape = (student_logits.shape[0],) if reduction == "none" else ()
    out = [student_logits.new_empty(shape, dtype=acc) for _ in range(3)]
    grad = student_logits.new_empty(student_logits.shape if compute_grad else (0,))
    return out[0], out[1], out[2], grad


def _setup_context(ctx, inputs, output):
    ctx.reduction = inputs[11]
    ctx.save_for_backward(output[3])
    ctx.mark_non_differentiable(output[1], output[2], output[3])
    ctx.set_materialize_grads(False)  # else backward gets an [N, V] zero tensor for the grad output


def _scale_rows_(grad: torch.Tensor, grad_loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """grad · grad_loss in place (a copy would double the [N, V] buffer): a scalar for mean/sum,
    one value per row for "none"."""
    g = grad_loss.to(grad.dtype)
    return C.scale_saved_(grad, g.unsqueeze(1) if reduction == "none" else g)


_TWICE = ("kd_loss: a second backward through the same graph (retain_graph=True) is not supported: the "
          "gradient was computed in forward and scaled in place by the first")


def _backward(ctx, grad_loss, _grad_kd, _grad_ce, _grad_grad):
    if grad_loss is None:
        return (None,) * 15
    if getattr(ctx, "scaled", False):
        raise RuntimeError(_TWICE)
    ctx.scaled = True
    (grad,) = ctx.saved_tensors
    return (_scale_rows_(grad, grad_loss, ctx.reduction),) + (None,) * 14


torch.library.register_autograd("clinkd::kd_loss", _backward, setup_context=_setup_context)


class _KDLossInplace(torch.autograd.Function):
    """The in-place variant: the gradient is written over the logits during forward (eager mode only)."""

    @staticmethod
    def forward(ctx, student_logits, labels, teacher_logits, idx, lp, res, token_weights, temperature, alpha,
                beta, ignore_index, reduction, t2_scale, backend):
        loss, kd, ce = _forward(student_logits, labels, teacher_logits, idx, lp, res, token_weights, temperature,
                                alpha, beta, ignore_index, reduction, t2_scale, student_logits, backend)
        # Anything autograd saved that still points at these logits is now stale: make using it an error.
        torch.autograd.graph.increment_version(student_logits)
        ctx.grad = student_logits  # kept outside save_for_backward: its version moved on purpose
        ctx.reduction = reduction
        ctx.mark_non_differentiable(kd, ce)
        ctx.set_materialize_grads(False)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        if grad_loss is None:
            return (None,) * 14
        if ctx.grad is None:
            raise RuntimeError(_TWICE)
        grad = _scale_rows_(ctx.grad, grad_loss, ctx.reduction)
        ctx.grad = None
        return (grad,) + (None,) * 13


def kd_loss(student_logits: torch.Tensor, labels: torch.Tensor, *, teacher_logits: torch.Tensor | None = None,
            teacher: PseudoLabels | None = None, temperature: float = 1.0, alpha: float = 0.5, beta: float = 1.0,
            ignore_index: int = -100, token_weights: torch.Tensor | None = None, reduction: str = "mean",
            t2_scale: bool = False, return_components: bool = False, inplace_grad: bool = False,
            backend: str | None = None):
    """Distillation loss (α·KD + β·CE)/(α + β) of student logits against a dense or top-k teacher.

    Args:
        student_logits: [N, V] fp32/fp16/bf16 (fp64 on the "cpu"/"torch" backends). ``-inf`` entries
            are allowed (masked vocabulary) as long as each valid row has a finite one. ``+inf`` entries
            make that row's softmax undefined: its loss and gradient are NaN.
        labels: [N] int64/int32 targets (already shifted by the caller); ``ignore_index`` marks rows
            that are not valid (no loss, zero gradient).
        teacher_logits: dense teacher [N, V_t], V_t >= V; columns beyond V are dropped before the softmax.
        teacher: sparse ``PseudoLabels`` [N, k] (indices, logprobs extracted at this temperature, residual).
            Give exactly one of the two teachers (or neither with alpha=0: cross-entropy alone).
        temperature: T > 0 for the KD softmaxes (the cross-entropy is at T = 1).
        alpha, beta: weights of KD and CE, >= 0, not both 0; beta=0 is KD alone.
        token_weights: [N] >= 0, weighting KD_i (not CE).
        reduction: "mean" | "sum" | "none" (per row, [N]); see DESIGN.md §3.4.
        t2_scale: multiply the KD term by T².
        return_components: also return the KD and CE parts (same reduction, no gradient) at no extra cost.
        inplace_grad: write the gradient over ``student_logits`` during forward instead of a new [N, V]
            buffer (saves one [N, V] tensor, as Liger's cross-entropy does). ``student_logits`` then holds
            the gradient and must not be used again; autograd raises if another op saved it for
            backward. Needs a contiguous tensor and eager mode (not torch.compile).
        backend: "triton" | "cpu" | "torch" (default: triton on CUDA, cpu on CPU; see ``_dispatch``).

    Returns:
        loss ([] fp32, or [N] for "none"), or (loss, kd, ce) with ``return_components``. Gradients flow
        to student_logits only; the gradient is made in forward and scaled in place by backward, so one
        backward per forward (a second one through the same graph raises).
    """
    check_tensor("student_logits", student_logits, ndim=2, dtypes=C.REFERENCE_DTYPES)
    n, vocab = student_logits.shape
    temperature, alpha, beta = C.check_options(temperature, alpha, beta, ignore_index, reduction)
    C.check_labels(labels, n, "student_logits", student_logits)
    C.check_token_weights(token_weights, n, "student_logits", student_logits)
    C.check_teacher_choice(alpha, teacher_logits is not None, teacher)
    if teacher_logits is not None:
        check_tensor("teacher_logits", teacher_logits, ndim=2, dtypes=C.REFERENCE_DTYPES)
        check_shape("teacher_logits", teacher_logits, [n, None])
        if teacher_logits.shape[1] < vocab:
            raise ValueError(f"teacher_logits must have at least the student's V={vocab} columns, "
                             f"got {teacher_logits.shape[1]}")
        check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    if teacher is not None:
        C.check_pseudo_labels_shapes(teacher, n, vocab, "student_logits", student_logits)
    if vocab == 0:
        raise ValueError("student_logits must have at least one column (V >= 1)")

    backend = resolve_backend("kd_loss", backend, student_logits.device, BACKENDS)
    if backend == "torch":
        if inplace_grad:
            raise ValueError("inplace_grad needs the 'triton' or 'cpu' backend, not 'torch'")
        C.check_values(labels, vocab, ignore_index, token_weights,
                       None if teacher is None else (teacher.indices, teacher.logprobs, teacher.residual))
        return kd_loss_reference(student_logits, labels, teacher_logits=teacher_logits, teacher=teacher,
                                 temperature=temperature, alpha=alpha, beta=beta, ignore_index=ignore_index,
                                 token_weights=token_weights, reduction=reduction, t2_scale=t2_scale,
                                 return_components=return_components)
    if backend == "triton" and student_logits.dtype == torch.float64:
        raise TypeError("student_logits must be fp32/fp16/bf16 for the triton backend, got float64")

    # The kernels read rows with unit column stride.
    z = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    t = None if teacher_logits is None else (teacher_logits if teacher_logits.stride(-1) == 1
                                            else teacher_logits.contiguous())
    idx = lp = res = None
    if teacher is not None:
        idx, lp, res = teacher.indices, teacher.logprobs, teacher.residual
    compute_grad = student_logits.requires_grad and torch.is_grad_enabled()

    if inplace_grad and compute_grad:
        if not student_logits.is_contiguous():
            raise ValueError("inplace_grad needs contiguous student_logits (the gradient is written over them)")
        if torch.compiler.is_compiling():
            raise RuntimeError("inplace_grad is eager-only; use inplace_grad=False under torch.compile")
        loss, kd, ce = _KDLossInplace.apply(student_logits, labels, t, idx, lp, res, token_weights, temperature,
                                            alpha, beta, ignore_index, reduction, t2_scale, backend)
    else:
        loss, kd, ce, _ = _kd_loss_op(z, labels, t, idx, lp, res, token_weights, temperature, alpha, beta,
                                      ignore_index, reduction, t2_scale, compute_grad, backend)
    return (loss, kd, ce) if return_components else loss
