"""The loss of the released ClinKD trainer, on correctly aligned labels: a loss form of the KD stage
(``KDSettings(form="released")``, config ``stages[].loss_form: released``).

    loss = (α·Σ_valid KL_T(teacher ‖ student)_i + mean_valid CE_i) / (1 + α),   α = 0.5, T = 0.5, no T²

The KD term is a *sum* over label positions while CE is a *mean* (clinkd's own form averages both).
Both are had from one "sum" reduction of the fused loss: with beta = 1 and every token weight equal
to n = #valid rows,

    sum-loss / n = Σ_i (α·n·KD_i + CE_i) / ((α + 1)·n) = (α Σ KD_i + mean CE) / (1 + α),

and n stays a tensor (no host sync, differentiable end to end). ``kd_only=True`` is the released
trainer's KD-alone switch: Σ_valid KL_T. The released code masked KD with unshifted labels (off by
one); here labels are the caller's, already shifted, as for every clinkd loss.
``released_loss_reference`` is the same total in plain PyTorch on full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clinkd_kernels import kd_loss, linear_kd_loss

RELEASED_ALPHA = 0.5
RELEASED_TEMPERATURE = 0.5


def _released_kwargs(labels, ignore_index, token_weights, alpha, kd_only):
    n_valid = (labels != ignore_index).sum().to(torch.float32)
    w = n_valid.expand(labels.shape) if token_weights is None else token_weights.to(torch.float32) * n_valid
    return dict(
        token_weights=w,
        alpha=alpha,
        beta=0.0 if kd_only else 1.0,
        reduction="sum",
        t2_scale=False,
        ignore_index=ignore_index,
    ), n_valid.clamp(min=1.0)


def _finish(out, n_valid, return_components):
    if return_components:
        loss, kd, ce = out
        return loss / n_valid, kd / n_valid, ce / n_valid  # kd = Σ_valid KL_i, ce = mean_valid CE_i
    return out / n_valid


def released_kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_logits=None,
    teacher=None,
    temperature: float = RELEASED_TEMPERATURE,
    alpha: float = RELEASED_ALPHA,
    ignore_index: int = -100,
    token_weights=None,
    kd_only: bool = False,
    return_components: bool = False,
    backend: str | None = None,
):
    """Released ClinKD total from student_logits [N, V], labels [N] and a dense teacher [N, V_t] or
    PseudoLabels. Returns loss [] (or (loss, Σ KL, mean CE)). token_weights [N], if given, weigh KL_i."""
    kwargs, n_valid = _released_kwargs(labels, ignore_index, token_weights, alpha, kd_only)
    out = kd_loss(
        student_logits,
        labels,
        teacher_logits=teacher_logits,
        teacher=teacher,
        temperature=temperature,
        return_components=return_components,
        backend=backend,
        **kwargs,
    )
    return _finish(out, n_valid, return_components)


def released_linear_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias=None,
    teacher_hidden=None,
    teacher_weight=None,
    teacher_bias=None,
    teacher=None,
    temperature: float = RELEASED_TEMPERATURE,
    alpha: float = RELEASED_ALPHA,
    ignore_index: int = -100,
    token_weights=None,
    kd_only: bool = False,
    return_components: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """``released_kd_loss`` fused with the lm_head: hidden [N, Hd], weight [V, Hd] (see linear_kd_loss)."""
    kwargs, n_valid = _released_kwargs(labels, ignore_index, token_weights, alpha, kd_only)
    out = linear_kd_loss(
        hidden,
        weight,
        labels,
        bias=bias,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        teacher=teacher,
        temperature=temperature,
        return_components=return_components,
        chunk_size=chunk_size,
        backend=backend,
        **kwargs,
    )
    return _finish(out, n_valid, return_components)


def released_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = RELEASED_TEMPERATURE,
    alpha: float = RELEASED_ALPHA,
    ignore_index: int = -100,
    kd_only: bool = False,
) -> torch.Tensor:
    """The released total on full logits, in plain PyTorch: student_logits [N, V], teacher_logits [N, V_t]
    (columns beyond V dropped), labels [N] (shifted) → loss []. Computed in fp32 (fp64 for fp64 logits)."""
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    vocab = student_logits.shape[-1]
    keep = labels != ignore_index
    z, t = student_logits[keep].to(dtype), teacher_logits[keep][:, :vocab].to(dtype)
    kl = F.kl_div(
        F.log_softmax(z / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1), log_target=True, reduction="sum"
    )
    if kd_only:
        return kl
    return (alpha * kl + F.cross_entropy(z, labels[keep])) / (1 + alpha)
