"""What ``kd_loss`` and ``linear_kd_loss`` share: the preamble both open with (``prepare_call``: argument
checks, backend resolution, options), the per-row contract (the options, the row function of each
backend, the reduction coefficients and the assembly of the loss) and the custom ops' signatures
(``op_signature``: the schema read from one NamedTuple of the op's arguments).

Every implementation (Triton kernel: ``launch.kd_rows_triton``; C++ CPU kernel: ``cpu.kd_rows_cpu``;
PyTorch on any device: ``portable.kd_rows_portable``) computes
per row only the raw KD_i and CE_i and the gradient of  coef_kd_i·KD_i + coef_ce_i·CE_i  w.r.t. the
row's logits, with one signature:

    z [n, V] logits (last dim contiguous); teacher_logits [n, >= V] or topk = (indices [n, k],
    logprobs [n, k], residual [n]) or neither; coef_kd, coef_ce [n]
    → writes kd_out, ce_out [n] (raw KD_i, CE_i) and, when given, grad_out [n, V] (may be z itself).
 The reduction, token
weights, T² and α/β all live in the two [N] coefficient vectors made here, before any row is
processed, so that a mean over the whole batch needs no second pass:

    w_i = token_weights_i·[valid_i],  s = T² if t2_scale else 1
    mean: kd_scale_i = s·w_i / Σ w,  ce_scale_i = [valid_i] / #valid      (0 when the sum is 0)
    sum, none: kd_scale_i = s·w_i,  ce_scale_i = [valid_i]
    coef_kd_i = α·kd_scale_i / (α + β),  coef_ce_i = β·ce_scale_i / (α + β)
    loss = Σ_i coef_kd_i·KD_i + coef_ce_i·CE_i   (per row for "none")
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import NamedTuple

import torch

from .._dispatch import resolve_backend
from . import checks

TWICE = (
    "a second backward through the same graph (retain_graph=True) is not supported: the gradient was "
    "computed in forward and scaled in place by the first"
)


class LossOptions(NamedTuple):
    """The scalar arguments of a distillation loss, as the ops and the autograd pass them on."""

    temperature: float
    alpha: float
    beta: float
    ignore_index: int
    reduction: str
    t2_scale: bool
    backend: str


def accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    """Per-row KD/CE and the reductions run in fp32 (fp64 for fp64 inputs)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def topk_fields(indices, logprobs, residual):
    """The sparse teacher as the row functions take it: (indices [N, k], logprobs [N, k], residual [N]),
    or None."""
    return None if indices is None else (indices, logprobs, residual)


def options_of(args) -> LossOptions:
    """The LossOptions of a custom op's argument tuple (``KDArgs``, ``LinearArgs``: same field names)."""
    return LossOptions(*(getattr(args, name) for name in LossOptions._fields))


def topk_of(args):
    """The sparse teacher of a custom op's argument tuple (its topk_* fields), or None."""
    return topk_fields(args.topk_indices, args.topk_logprobs, args.topk_residual)


def prepare_call(
    op: str,
    ref_name: str,
    ref: torch.Tensor,
    *,
    vocab: int,
    labels,
    token_weights,
    teacher,
    has_dense: bool,
    check_own: Callable[[], None],
    temperature,
    alpha,
    beta,
    ignore_index,
    reduction,
    t2_scale: bool,
    backend: str | None,
) -> LossOptions:
    """The preamble of ``kd_loss`` and ``linear_kd_loss``, after each checked its student tensor ``ref``
    ([N, V] logits or [N, Hd] hidden states, named ``ref_name``; ``vocab`` = V).

    Checks the scalar options, labels [N] and token_weights [N], which teacher is given (``has_dense``:
    the op's dense teacher tensors; ``teacher``: PseudoLabels [N, k]), then runs ``check_own`` (the op's
    own checks: its dense teacher's tensors, its chunk size), then resolves the backend
    (``OP_BACKENDS[op]``). Returns the validated options with the backend chosen.
    """
    temperature, alpha, beta = checks.check_options(temperature, alpha, beta, ignore_index, reduction)
    n = ref.shape[0]
    checks.check_rows(labels, token_weights, n, ref_name, ref)
    checks.check_teacher(alpha, has_dense, teacher, n_rows=n, vocab=vocab, ref_name=ref_name, ref=ref)
    check_own()
    backend = resolve_backend(op, backend, ref.device)
    if backend == "triton" and ref.dtype == torch.float64:
        raise TypeError(f"{ref_name} must be fp32/fp16/bf16 for the triton backend, got float64")
    return LossOptions(temperature, alpha, beta, ignore_index, reduction, t2_scale, backend)


def op_signature(fields: type, *, leading: tuple[tuple[str, type], ...] = (), returns) -> inspect.Signature:
    """The Python signature ``torch.library.custom_op`` infers an op's schema from: the ``leading``
    (name, type) parameters, then one per field of the NamedTuple ``fields`` (its annotations)."""
    hints = typing.get_type_hints(fields)
    params = [*leading, *((name, hints[name]) for name in fields._fields)]
    return inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=ann) for name, ann in params],
        return_annotation=returns,
    )


def rows_function(backend: str):
    """The row function of "triton", "cpu" or "portable" (each module is imported only when used)."""
    if backend == "triton":
        from .launch import kd_rows_triton

        return kd_rows_triton
    if backend == "cpu":
        from .cpu import kd_rows_cpu

        return kd_rows_cpu
    from .portable import kd_rows_portable

    return kd_rows_portable


def coefficients(
    labels: torch.Tensor,
    token_weights,
    *,
    ignore_index: int,
    temperature: float,
    alpha: float,
    beta: float,
    reduction: str,
    t2_scale: bool,
    dtype=torch.float32,
):
    """(coef_kd [N], coef_ce [N], kd_scale [N], ce_scale [N]) as in the module docstring; no host sync."""
    valid = labels != ignore_index
    w = (
        torch.ones(labels.shape, dtype=dtype, device=labels.device)
        if token_weights is None
        else token_weights.to(dtype)
    )
    w = torch.where(valid, w, torch.zeros_like(w))
    v = valid.to(dtype)
    kd_scale = w * (temperature**2 if t2_scale else 1.0)
    ce_scale = v
    if reduction == "mean":
        w_sum, n_valid = w.sum(), v.sum()
        kd_scale = torch.where(w_sum > 0, kd_scale / torch.where(w_sum > 0, w_sum, 1.0), 0.0)
        ce_scale = ce_scale / n_valid.clamp(min=1.0)
    total = alpha + beta
    return kd_scale * (alpha / total), ce_scale * (beta / total), kd_scale, ce_scale


def assemble(
    kd_rows: torch.Tensor,
    ce_rows: torch.Tensor,
    kd_scale: torch.Tensor,
    ce_scale: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    reduction: str,
):
    """(loss, kd, ce) from the raw per-row KD_i, CE_i: [] each, or [N] each for "none".

    A row with scale 0 contributes 0 even when its KD_i is infinite (a weight-0 row is dropped).
    """
    kd_part = torch.where(kd_scale != 0, kd_scale * kd_rows, 0.0)
    ce_part = torch.where(ce_scale != 0, ce_scale * ce_rows, 0.0)
    if reduction != "none":  # sums over rows in float64: one rounding at the end
        kd_part = kd_part.sum(dtype=torch.float64).to(kd_rows.dtype)
        ce_part = ce_part.sum(dtype=torch.float64).to(ce_rows.dtype)
    loss = torch.zeros_like(kd_part)
    if alpha != 0:
        loss = loss + alpha * kd_part
    if beta != 0:
        loss = loss + beta * ce_part
    return loss / (alpha + beta), kd_part, ce_part


def scale_saved_(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """grad·factor for a gradient saved by forward: in place in eager mode (a copy would double a
    [N, V] or [V, Hd] buffer at the peak of backward), out of place while torch.compile /
    aot_autograd traces the backward (functionalised graphs must not mutate saved tensors)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if torch.compiler.is_compiling() or isinstance(grad, (FunctionalTensor, FakeTensor)):
        return grad * factor
    return grad.mul_(factor)
