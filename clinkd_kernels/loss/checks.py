"""Argument checks of ``kd_loss`` and ``linear_kd_loss``: shapes, dtypes and devices before any work, and
the checks that read tensor values (one host sync), run inside the custom ops.

Every error names the argument, what was expected and what was given.
"""

from __future__ import annotations

import torch

from .._validation import (
    FLOAT_DTYPES,
    check_int,
    check_nonnegative_float,
    check_same_device,
    check_shape,
    check_temperature,
    check_tensor,
    first_rows,
)
from ..topk import PseudoLabels

REDUCTIONS = ("mean", "sum", "none")
REFERENCE_DTYPES = FLOAT_DTYPES + (torch.float64,)  # float64: the "cpu" and "torch" backends
LABEL_DTYPES = (torch.int64, torch.int32)


def check_options(temperature, alpha, beta, ignore_index, reduction) -> tuple[float, float, float]:
    """The scalar options of both losses; returns (temperature, alpha, beta) as floats."""
    temperature = check_temperature("temperature", temperature)
    alpha = check_nonnegative_float("alpha", alpha)
    beta = check_nonnegative_float("beta", beta)
    if alpha + beta == 0:
        raise ValueError("alpha and beta must not both be 0 (alpha weighs the KD term, beta the cross-entropy)")
    check_int("ignore_index", ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return temperature, alpha, beta


def check_rows(labels, token_weights, n_rows: int, ref_name: str, ref: torch.Tensor) -> None:
    """labels [N] int64/int32 and token_weights [N] (or None), on ``ref``'s device."""
    check_tensor("labels", labels, ndim=1, dtypes=LABEL_DTYPES)
    check_shape("labels", labels, [n_rows])
    check_same_device(**{ref_name: ref, "labels": labels})
    if token_weights is not None:
        check_tensor("token_weights", token_weights, ndim=1, dtypes=REFERENCE_DTYPES)
        check_shape("token_weights", token_weights, [n_rows])
        check_same_device(**{ref_name: ref, "token_weights": token_weights})


def _check_vocab(name: str, what: str, got: int, student_vocab: int | None) -> None:
    """The student needs V >= 1; a teacher at least the student's V (its columns beyond V are dropped)."""
    if got < (1 if student_vocab is None else student_vocab):
        want = (
            f"at least one {what} (V >= 1)"
            if student_vocab is None
            else f"at least the student's V={student_vocab} {what}s"
        )
        raise ValueError(f"{name} must have {want}, got {got}")


def check_logits(
    name: str,
    logits,
    *,
    n_rows: int | None = None,
    student_vocab: int | None = None,
    ref_name: str | None = None,
    ref=None,
) -> None:
    """logits [N, V]: the student's (``student_vocab`` None: V >= 1) or a teacher's (V >= student_vocab,
    [n_rows, *], on ``ref``'s device)."""
    check_tensor(name, logits, ndim=2, dtypes=REFERENCE_DTYPES)
    if n_rows is not None:
        check_shape(name, logits, [n_rows, None])
    _check_vocab(name, "column", logits.shape[1], student_vocab)
    if ref is not None:
        check_same_device(**{ref_name: ref, name: logits})


def check_lm_head(
    prefix: str,
    hidden,
    weight,
    bias,
    *,
    n_rows: int | None = None,
    student_vocab: int | None = None,
    ref_name: str,
    ref,
) -> None:
    """An lm_head's inputs: {prefix}hidden [N, Hd], {prefix}weight [V, Hd], {prefix}bias [V] or None, one
    dtype, on ``ref``'s device. The student's head (prefix "", ``student_vocab`` None) needs V >= 1; a
    teacher's (prefix "teacher_") [n_rows, *] hidden states and V >= student_vocab."""
    h, w, b = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    check_tensor(h, hidden, ndim=2, dtypes=REFERENCE_DTYPES)
    check_tensor(w, weight, ndim=2, dtypes=REFERENCE_DTYPES)
    if n_rows is not None:
        check_shape(h, hidden, [n_rows, None])
    check_shape(w, weight, [None, hidden.shape[1]])
    _check_vocab(w, "row", weight.shape[0], student_vocab)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w} must have the dtype of {h} ({hidden.dtype}), got {weight.dtype}")
    check_same_device(**{ref_name: ref, h: hidden, w: weight})
    if bias is not None:
        check_tensor(b, bias, ndim=1)
        check_shape(b, bias, [weight.shape[0]])
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{b} must have the dtype of {h} ({hidden.dtype}), got {bias.dtype}")
        check_same_device(**{ref_name: ref, b: bias})


def check_teacher(
    alpha: float, has_dense: bool, teacher, *, n_rows: int, vocab: int, ref_name: str, ref: torch.Tensor
) -> None:
    """At most one teacher, one when alpha > 0; ``teacher`` pseudo-labels of [N, k] with 1 <= k <= V."""
    if has_dense and teacher is not None:
        raise ValueError("give either a dense teacher or `teacher` pseudo-labels, not both")
    if alpha > 0 and not has_dense and teacher is None:
        raise ValueError(
            "alpha > 0 needs a teacher: pass the dense teacher or `teacher` pseudo-labels "
            "(or alpha=0 for cross-entropy alone)"
        )
    if teacher is None:
        return
    if not isinstance(teacher, PseudoLabels):
        raise TypeError(f"teacher must be a PseudoLabels (clinkd_kernels.PseudoLabels), got {type(teacher).__name__}")
    check_tensor("teacher.indices", teacher.indices, ndim=2, dtypes=LABEL_DTYPES)
    k = teacher.indices.shape[1]
    check_shape("teacher.indices", teacher.indices, [n_rows, None])
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher.indices must have k in [1, {vocab}] (the student vocabulary) columns, got k={k}")
    check_tensor("teacher.logprobs", teacher.logprobs, ndim=2, dtypes=REFERENCE_DTYPES)
    check_shape("teacher.logprobs", teacher.logprobs, [n_rows, k])
    check_tensor("teacher.residual", teacher.residual, ndim=1, dtypes=REFERENCE_DTYPES)
    check_shape("teacher.residual", teacher.residual, [n_rows])
    check_same_device(
        **{
            ref_name: ref,
            "teacher.indices": teacher.indices,
            "teacher.logprobs": teacher.logprobs,
            "teacher.residual": teacher.residual,
        }
    )


def rows_without_distribution(logits: torch.Tensor, labels: torch.Tensor, vocab: int, ignore_index: int):
    """bool [N]: labelled rows (labels != ignore_index) whose logits [N, >= vocab] (first ``vocab``
    columns) hold a NaN or a +inf, or are all −inf: their softmax is NaN, so they define no distribution.
    One reduction (a max propagates NaN and +inf, and is −inf only when every entry is)."""
    top = logits[:, :vocab].amax(dim=1) if logits.shape[0] and vocab else logits.new_zeros(logits.shape[0])
    return (labels != ignore_index) & ~torch.isfinite(top)


def bad_teacher_rows(teacher_logits: torch.Tensor, labels: torch.Tensor, vocab: int, ignore_index: int):
    """bool [N]: labelled rows whose dense teacher logits define no distribution (so no KD term)."""
    return rows_without_distribution(teacher_logits, labels, vocab, ignore_index)


def bad_teacher_message(bad: torch.Tensor) -> str:
    return (
        f"teacher logits rows must hold no NaN or +inf and at least one finite value (they define the "
        f"teacher's distribution); rows {first_rows(bad)} do not"
    )


def bad_student_message(bad: torch.Tensor, name: str = "student_logits") -> str:
    """The error of labelled rows whose student logits (``name``: the tensor, or the lm_head product that
    forms them) define no distribution."""
    return (
        f"{name} rows with a label must hold no NaN or +inf and at least one finite value (they define the "
        f"student's distribution); rows {first_rows(bad)} do not"
    )


def _topk_checks(topk, vocab: int) -> list:
    """(row mask [N], message) pairs of ``check_values`` for pseudo-labels (indices, logprobs [N, k],
    residual [N])."""
    idx, lp, res = topk
    checks = []
    checks.append(
        (
            ((idx < 0) | (idx >= vocab)).any(1),
            lambda bad: (
                f"teacher.indices must be in [0, {vocab}) (the student vocabulary); rows {first_rows(bad)} are not"
            ),
        )
    )
    if idx.shape[1] > 1:
        srt = idx.sort(dim=1).values
        checks.append(
            (
                (srt[:, 1:] == srt[:, :-1]).any(1),
                lambda bad: f"teacher.indices must not repeat a token within a row; rows {first_rows(bad)} do",
            )
        )
    # log-probabilities are <= 0 up to rounding; the residual is a probability mass.
    checks.append(
        (
            (torch.isnan(lp) | (lp > 1e-4)).any(1),
            lambda bad: f"teacher.logprobs must be log-probabilities (<= 0, no NaN); rows {first_rows(bad)} are not",
        )
    )
    checks.append(
        (
            ~(res >= 0) | (res > 1 + 1e-4),
            lambda bad: f"teacher.residual must be in [0, 1]; rows {first_rows(bad)} are not",
        )
    )
    checks.append(
        (
            lp.double().exp().sum(1) > 1 + 1e-4,
            lambda bad: (
                f"teacher.logprobs must be the log-probabilities of one distribution (their "
                f"probabilities sum to at most 1); rows {first_rows(bad)} sum above 1"
            ),
        )
    )
    return checks


def check_values(
    labels: torch.Tensor,
    vocab: int,
    ignore_index: int,
    token_weights,
    topk,
    teacher_logits: torch.Tensor | None = None,
    student_logits: torch.Tensor | None = None,
    student_name: str = "student_logits",
) -> None:
    """Checks that read tensor values (one host sync): labels [N], token weights [N], pseudo-labels
    [N, k], dense teacher logits [N, >= V], student logits [N, V] (labelled rows only: NaN, +inf or all
    −inf is refused; ``student_name`` is what the error calls them).

    ``topk`` is (indices, logprobs, residual) or None. Run inside the ops, so a compiled graph
    keeps them without a graph break. Every check's row mask is built on the device and their
    ``any()`` flags come to the host together; the first failing check (in the order below) raises.
    """
    checks = [
        (
            (labels != ignore_index) & ((labels < 0) | (labels >= vocab)),
            lambda bad: (
                f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
                f"rows {first_rows(bad)} hold e.g. {labels[bad][:3].tolist()}"
            ),
        )
    ]
    if token_weights is not None:
        checks.append(
            (
                ~torch.isfinite(token_weights) | (token_weights < 0),
                lambda bad: f"token_weights must be finite and >= 0; rows {first_rows(bad)} are not",
            )
        )
    if topk is not None:
        checks += _topk_checks(topk, vocab)
    if teacher_logits is not None:
        bad_teacher = bad_teacher_rows(teacher_logits, labels, vocab, ignore_index)
        checks.append((bad_teacher, bad_teacher_message))
    if student_logits is not None:
        checks.append(
            (
                rows_without_distribution(student_logits, labels, vocab, ignore_index),
                lambda bad: bad_student_message(bad, student_name),
            )
        )
    failed = torch.stack([bad.any() for bad, _ in checks]).tolist()
    for (bad, message), hit in zip(checks, failed):
        if hit:
            raise ValueError(message(bad))
