"""``linear_kd_loss``: the distillation loss fused with the lm_head, without [N, V] logits for the batch:
the public function, the chunk loop, the custom ops and the autograd (the checks are ``checks.py``'s,
the preamble ``rows.prepare_call``; the ops' 22 arguments are written once, as ``LinearArgs``).

Rows labelled ignore_index are dropped first (their loss and gradient are zero: ``_run_valid_rows``);
the others are processed in chunks of ``chunk_size`` rows. Per chunk (h = hidden[chunk]):

    logits   = h Wᵀ + b                       [chunk, V]   (torch matmul: cuBLAS / CPU BLAS)
    teacher  = h_t W_t[:V]ᵀ + b_t[:V]          [chunk, V]   (dense teacher; no gradient)
    KD_i, CE_i, dlogits  ← the row function (``rows.rows_function``), dlogits written over the logits
    grad_hidden[chunk] = dlogits W,  grad_W += dlogitsᵀ h,  grad_b += Σ_rows dlogits

For mean/sum the gradients are complete after forward and backward only scales them, in place, by
grad_output; so one backward per forward (retain_graph=True and a second backward raise). For
reduction="none" grad_output differs per row and cannot be applied afterwards to grad_W, so forward
stores nothing and backward recomputes the chunks with the row scales folded into the
coefficients. grad_W / grad_b accumulate in fp32 (for fp16/bf16 weights the accumulator is an extra
fp32 [V, Hd]). The [chunk, V] logits (and teacher logits) buffers are the only vocabulary-sized memory.

    clinkd::linear_kd_loss               forward: loss, kd, ce and (mean/sum) the three gradients
    clinkd::linear_kd_loss_backward_rows backward of "none": the gradients for a per-row grad_output
    _LinearKDLoss                        the one autograd, over both (custom ops have no autograd of
                                         their own: opaque nodes for torch.compile)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._memory import empty_output
from .._validation import check_int
from ..topk import PseudoLabels
from . import checks
from .reference import linear_kd_loss_reference
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
    topk_of,
)


def default_chunk_size(n_rows: int, vocab: int, device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """Rows per chunk so that one [chunk, V] logits buffer is about 128 MiB on CPU (fp32 compute; the row
    path's own temporaries are bounded separately) or 512 MiB on CUDA (logits in ``dtype``), capped by
    1/16 of the free GPU memory; a power of two in [16, 4096], never above n_rows rounded up to a power of two.

    The lm_head matmuls want many rows: with few rows a matmul against a Qwen-size vocabulary is bound by
    reading the weight (GPU) and CPU BLAS runs far below its peak, so a chunk is as large as the memory
    budget allows.
    """
    budget = 128 * 2**20
    element = 8 if dtype == torch.float64 else 4
    if device.type == "cuda":
        element = torch.empty(0, dtype=dtype).element_size()
        budget = 512 * 2**20
        try:
            free, _ = torch.cuda.mem_get_info(device)
            budget = min(budget, free // 16)
        except Exception:  # pragma: no cover - mem_get_info unsupported: keep the static budget
            pass
    rows = max(16, budget // (vocab * element))
    rows = 1 << (rows.bit_length() - 1)
    rows = min(rows, 4096, 1 << max(0, (max(n_rows, 1) - 1).bit_length()))
    return max(rows, 1)


_ADDMM_OUT_DTYPE_OK: dict = {}  # device type → whether addmm(out_dtype=fp32, out=acc) works there


def _accumulate_wgrad(acc: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor, *, first: bool) -> None:
    """acc [V, Hd] += dlogitsᵀ h (``first``: acc = dlogitsᵀ h, whatever acc held), with acc in fp32 and
    dlogits, h possibly fp16/bf16. The first chunk writes the accumulator (beta = 0 ignores its contents,
    NaN included), so it is never zero-filled: a fill would be one more pass over the [V, Hd] buffer."""
    beta = 0.0 if first else 1.0
    if dlogits.dtype == acc.dtype:
        if first:  # mm into the buffer, not addmm_ with beta = 0: CPU BLAS runs that one slower
            torch.mm(dlogits.t(), h, out=acc)
        else:
            acc.addmm_(dlogits.t(), h)
        return
    key = acc.device.type
    if _ADDMM_OUT_DTYPE_OK.get(key, key == "cuda"):
        try:  # cuBLAS accumulates the low-precision product straight into fp32
            torch.addmm(acc, dlogits.t(), h, beta=beta, out_dtype=acc.dtype, out=acc)
            _ADDMM_OUT_DTYPE_OK[key] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_OUT_DTYPE_OK[key] = False
    step = 8192  # vocabulary slices bound the low-precision temporary
    for a in range(0, acc.shape[0], step):
        part = dlogits[:, a : a + step].t() @ h
        if first:
            acc[a : a + step].copy_(part)
        else:
            acc[a : a + step].add_(part)


def _lm_head(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, out: torch.Tensor) -> torch.Tensor:
    """out [rows, V] = h Wᵀ (+ b), written into the chunk buffer; returns out."""
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _weight_grad_dtype(weight: torch.Tensor) -> torch.dtype:
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def _run_chunks(
    hidden,
    weight,
    labels,
    bias,
    t_hidden,
    t_weight,
    t_bias,
    topk,
    *,
    coef_kd,
    coef_ce,
    inv_t,
    ignore_index,
    chunk,
    backend,
    grad_hidden,
    grad_weight,
    grad_bias,
):
    """Chunk loop. Returns (kd_rows [N], ce_rows [N], grad_hidden | None, grad_W fp32 | None, grad_b fp32 | None)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = rows_function(backend)
    acc = accumulate_dtype(hidden)
    kd_rows = empty_output((n,), dtype=acc, device=hidden.device)
    ce_rows = empty_output((n,), dtype=acc, device=hidden.device)
    need_grad = grad_hidden or grad_weight or grad_bias
    gh = empty_output(hidden.shape, dtype=hidden.dtype, device=hidden.device) if grad_hidden else None
    acc_w = _weight_grad_dtype(weight)
    # Accumulators the first chunk writes (no zero fill); zeros only when there is no chunk at all.
    if n == 0:
        gw = torch.zeros(weight.shape, dtype=acc_w, device=weight.device) if grad_weight else None
        gb = torch.zeros((vocab,), dtype=acc_w, device=weight.device) if grad_bias else None
    else:
        # grad_W from the CPU buffer cache: a training loop frees and needs it again every step (_memory.py)
        gw = empty_output(weight.shape, dtype=acc_w, device=weight.device, cached=True) if grad_weight else None
        gb = empty_output((vocab,), dtype=acc_w, device=weight.device) if grad_bias else None
    tw = None if t_weight is None else t_weight[:vocab]
    tb = None if t_bias is None else t_bias[:vocab]
    # One [chunk, V] buffer each for the logits (then their gradient) and the teacher's logits, reused by
    # every chunk, so the page faults of a fresh buffer (first touch: map and zero every page) are paid
    # once per call, not once per chunk. Not kept after the call: held in the buffer cache they would stay
    # resident through the model's backward and raise the step's peak memory, for no time saved.
    rows_max = min(chunk, n)
    logits_buf = empty_output((rows_max, vocab), dtype=hidden.dtype, device=hidden.device, huge_pages=True)
    t_buf = None
    if tw is not None:
        if n <= chunk and gw is not None and gw.dtype == t_hidden.dtype and rows_max * vocab <= gw.numel():
            # One chunk: grad_W is not written before the teacher's logits are spent, so they live in
            # its buffer (rows·V <= V·Hd elements). Peak memory is then grad_W + one [rows, V] buffer,
            # the least a chunk needs, also when grad_W's buffer is a cached one resident before the call.
            t_buf = gw.view(-1)[: rows_max * vocab].view(rows_max, vocab)
        else:
            t_buf = empty_output((rows_max, vocab), dtype=t_hidden.dtype, device=hidden.device, huge_pages=True)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        h = hidden[a:b]
        logits = _lm_head(h, weight, bias, out=logits_buf[: b - a])
        t_logits = None if tw is None else _lm_head(t_hidden[a:b], tw, tb, out=t_buf[: b - a])
        rows(
            logits,
            labels[a:b],
            teacher_logits=t_logits,
            topk=None if topk is None else tuple(x[a:b] for x in topk),
            inv_t=inv_t,
            ignore_index=ignore_index,
            coef_kd=coef_kd[a:b],
            coef_ce=coef_ce[a:b],
            kd_out=kd_rows[a:b],
            ce_out=ce_rows[a:b],
            grad_out=logits if need_grad else None,
        )  # the gradient overwrites the chunk's logits
        del t_logits
        if b == n:  # the teacher's buffer is done: free it before the gradient matmuls touch grad_W
            t_buf = None
        if grad_hidden:
            torch.mm(logits, weight, out=gh[a:b])
        if grad_weight:
            _accumulate_wgrad(gw, logits, h, first=a == 0)
        if grad_bias:
            if a == 0:
                torch.sum(logits, 0, dtype=acc_w, out=gb)
            else:
                gb.add_(logits.sum(0, dtype=acc_w))
        del logits
    return kd_rows, ce_rows, gh, gw, gb


def _run_valid_rows(
    hidden, weight, labels, bias, t_hidden, t_weight, t_bias, topk, *, coef_kd, coef_ce, ignore_index, **kw
):
    """``_run_chunks`` over the rows that have a loss only: an ignore_index row has KD_i = CE_i = 0 and a
    zero gradient row, so its lm_head products (student and teacher, forward and backward) are skipped,
    not computed and then multiplied by zero. In instruction tuning most rows are ignored (the prompt,
    the image tokens, padding), and every lm_head matmul shrinks by their share. One host sync (the
    count of valid rows); the inputs of the valid rows are gathered ([rows, Hd], small beside the
    matmuls) and the per-row outputs scattered back. An ignored row whose hidden state holds NaN or inf
    no longer reaches grad_W through 0·NaN."""
    n = hidden.shape[0]
    valid = labels != ignore_index
    n_valid = int(valid.sum())
    if n_valid == n:
        return _run_chunks(
            hidden,
            weight,
            labels,
            bias,
            t_hidden,
            t_weight,
            t_bias,
            topk,
            coef_kd=coef_kd,
            coef_ce=coef_ce,
            ignore_index=ignore_index,
            **kw,
        )
    rows = valid.nonzero().squeeze(1)
    pick = lambda t: None if t is None else t.index_select(0, rows)  # noqa: E731
    kd_v, ce_v, gh_v, gw, gb = _run_chunks(
        pick(hidden),
        weight,
        pick(labels),
        bias,
        pick(t_hidden),
        t_weight,
        t_bias,
        None if topk is None else tuple(pick(x) for x in topk),
        coef_kd=pick(coef_kd),
        coef_ce=pick(coef_ce),
        ignore_index=ignore_index,
        **kw,
    )
    kd_rows = kd_v.new_zeros(n).index_copy_(0, rows, kd_v)
    ce_rows = ce_v.new_zeros(n).index_copy_(0, rows, ce_v)
    gh = None if gh_v is None else gh_v.new_zeros(hidden.shape).index_copy_(0, rows, gh_v)
    return kd_rows, ce_rows, gh, gw, gb


STUDENT_LOGITS = "the student logits hidden @ weight.T (+ bias)"


def _head_rows(hidden, weight, bias, rows):
    """The logits [len(rows), V] of the given rows of hidden [N, Hd] through weight [V, Hd], bias [V]."""
    logits = hidden[rows] @ weight.t()
    return logits if bias is None else logits + bias


def _check_distributions(kd_rows, ce_rows, a: LinearArgs) -> None:
    """Refuse labelled rows whose dense teacher or student logits define no distribution (NaN, +inf or
    all −inf): such a row, and only such a row, has a KD_i or CE_i [N] that is not finite. One host sync
    on those [N] values, no pass over the logits or the weights; only on that error path are the logits
    of the suspect rows formed again, to tell the teacher from the student (and from a legitimately
    infinite CE_i: a −inf logit at the label)."""
    valid = a.labels != a.ignore_index
    suspect = valid & ~(torch.isfinite(kd_rows) & torch.isfinite(ce_rows))
    if not bool(suspect.any()):
        return
    vocab = a.weight.shape[0]
    rows = suspect.nonzero().squeeze(1)
    labels = a.labels[rows]
    bad = torch.zeros_like(suspect)
    with torch.no_grad():
        if a.teacher_weight is not None:
            t_bias = None if a.teacher_bias is None else a.teacher_bias[:vocab]
            t_logits = _head_rows(a.teacher_hidden, a.teacher_weight[:vocab], t_bias, rows)
            bad[rows] = checks.bad_teacher_rows(t_logits, labels, vocab, a.ignore_index)
            if bool(bad.any()):
                raise ValueError(checks.bad_teacher_message(bad))
        logits = _head_rows(a.hidden, a.weight, a.bias, rows)
        bad[rows] = checks.rows_without_distribution(logits, labels, vocab, a.ignore_index)
    if bool(bad.any()):
        raise ValueError(checks.bad_student_message(bad, STUDENT_LOGITS))


def _or_empty(grad, like, dtype=None):
    """A gradient not computed travels through the op schema as an empty tensor."""
    return grad if grad is not None else like.new_empty(0, dtype=dtype)


class LinearArgs(NamedTuple):
    """The arguments of the custom op ``clinkd::linear_kd_loss``, in its schema's order: the one place they
    are written. ``clinkd::linear_kd_loss_backward_rows`` takes grad_loss [N] and then the same, and the
    autograd ``_LinearKDLoss`` takes the same (its backward returns one gradient per field)."""

    hidden: torch.Tensor  # [N, Hd]
    weight: torch.Tensor  # [V, Hd]
    labels: torch.Tensor  # [N]
    bias: torch.Tensor | None  # [V]
    teacher_hidden: torch.Tensor | None  # [N, Hd_t]
    teacher_weight: torch.Tensor | None  # [V_t >= V, Hd_t]
    teacher_bias: torch.Tensor | None  # [V_t]
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
    chunk_size: int
    grad_hidden: bool
    grad_weight: bool
    grad_bias: bool
    backend: str

    @classmethod
    def of(cls, tensors: tuple, o: LossOptions, *, chunk_size: int, wanted: tuple[bool, bool, bool]) -> LinearArgs:
        """The op's arguments from its tensors (hidden … token_weights, in field order), the options and the
        gradients wanted (hidden, weight, bias)."""
        return cls(
            *tensors,
            o.temperature,
            o.alpha,
            o.beta,
            o.ignore_index,
            o.reduction,
            o.t2_scale,
            chunk_size,
            *wanted,
            o.backend,
        )

    options = property(options_of)
    topk = property(topk_of)

    @property
    def wanted(self) -> tuple[bool, bool, bool]:
        """(hidden, weight, bias): which gradients to compute (bias only where there is one)."""
        return self.grad_hidden, self.grad_weight, self.grad_bias and self.bias is not None


_TENSORS = LinearArgs._fields[: LinearArgs._fields.index("token_weights") + 1]  # the tensor fields
_GRADS = tuple[(torch.Tensor,) * 3]


def _chunk_loop(a: LinearArgs, grad_loss: torch.Tensor | None = None):
    """The chunk loop of one call: (kd_rows [N], ce_rows [N], kd_scale [N], ce_scale [N], grad_hidden
    [N, Hd], grad_weight fp32 [V, Hd], grad_bias fp32 [V]), each gradient None unless wanted and made
    here: in forward for mean/sum; for "none" only in the backward, which passes the per-row grad_loss
    [N] that scales the row coefficients."""
    acc = accumulate_dtype(a.hidden)
    reduction = a.reduction if grad_loss is None else "none"
    coef_kd, coef_ce, kd_scale, ce_scale = coefficients(
        a.labels,
        a.token_weights,
        ignore_index=a.ignore_index,
        temperature=a.temperature,
        alpha=a.alpha,
        beta=a.beta,
        reduction=reduction,
        t2_scale=a.t2_scale,
        dtype=acc,
    )
    if grad_loss is not None:
        g = grad_loss.to(acc)
        coef_kd, coef_ce = coef_kd * g, coef_ce * g
    keep = grad_loss is not None or reduction != "none"
    want_h, want_w, want_b = (keep and w for w in a.wanted)
    kd_rows, ce_rows, gh, gw, gb = _run_valid_rows(
        a.hidden,
        a.weight,
        a.labels,
        a.bias,
        a.teacher_hidden,
        a.teacher_weight,
        a.teacher_bias,
        a.topk,
        coef_kd=coef_kd,
        coef_ce=coef_ce,
        inv_t=1.0 / a.temperature,
        ignore_index=a.ignore_index,
        chunk=a.chunk_size,
        backend=a.backend,
        grad_hidden=want_h,
        grad_weight=want_w,
        grad_bias=want_b,
    )
    return kd_rows, ce_rows, kd_scale, ce_scale, gh, gw, gb


def _linear_kd_loss_impl(*args):
    """(loss, kd, ce, grad_hidden, grad_weight fp32, grad_bias fp32); a gradient not asked for is [0].
    With reduction="none" no gradient is computed here (backward recomputes)."""
    a = LinearArgs(*args)
    checks.check_values(a.labels, a.weight.shape[0], a.ignore_index, a.token_weights, a.topk)
    kd_rows, ce_rows, kd_scale, ce_scale, gh, gw, gb = _chunk_loop(a)
    _check_distributions(kd_rows, ce_rows, a)
    loss, kd, ce = assemble(kd_rows, ce_rows, kd_scale, ce_scale, alpha=a.alpha, beta=a.beta, reduction=a.reduction)
    return loss, kd, ce, _or_empty(gh, a.hidden), _or_empty(gw, kd_rows), _or_empty(gb, kd_rows)


def _backward_rows_impl(grad_loss, *args):
    """Backward of reduction="none": recompute the chunks with coefficients scaled by grad_loss [N]."""
    a = LinearArgs(*args)
    acc = accumulate_dtype(a.hidden)
    *_, gh, gw, gb = _chunk_loop(a, grad_loss)
    return _or_empty(gh, a.hidden), _or_empty(gw, a.hidden, acc), _or_empty(gb, a.hidden, acc)


_linear_kd_loss_impl.__signature__ = op_signature(LinearArgs, returns=tuple[(torch.Tensor,) * 6])
_backward_rows_impl.__signature__ = op_signature(LinearArgs, leading=(("grad_loss", torch.Tensor),), returns=_GRADS)
_linear_kd_loss_op = torch.library.custom_op("clinkd::linear_kd_loss", _linear_kd_loss_impl, mutates_args=())
_linear_backward_rows_op = torch.library.custom_op(
    "clinkd::linear_kd_loss_backward_rows", _backward_rows_impl, mutates_args=()
)


def _grad_shapes(a: LinearArgs, *, keep: bool):
    """Fake (grad_hidden, grad_weight, grad_bias): [0] where not computed (``keep`` False: none is)."""
    acc, wacc = accumulate_dtype(a.hidden), _weight_grad_dtype(a.weight)
    want_h, want_w, want_b = (keep and w for w in a.wanted)
    gh = a.hidden.new_empty(a.hidden.shape if want_h else (0,))
    gw = a.weight.new_empty(a.weight.shape if want_w else (0,), dtype=wacc if want_w else acc)
    gb = a.weight.new_empty((a.weight.shape[0],) if want_b else (0,), dtype=wacc if want_b else acc)
    return gh, gw, gb


@_linear_kd_loss_op.register_fake
def _(*args):
    a = LinearArgs(*args)
    shape = (a.hidden.shape[0],) if a.reduction == "none" else ()
    loss, kd, ce = (a.hidden.new_empty(shape, dtype=accumulate_dtype(a.hidden)) for _ in range(3))
    return (loss, kd, ce) + _grad_shapes(a, keep=a.reduction != "none")


@_linear_backward_rows_op.register_fake
def _(grad_loss, *args):
    return _grad_shapes(LinearArgs(*args), keep=True)


class _LinearKDLoss(torch.autograd.Function):
    """Takes the op's arguments (``LinearArgs``). mean/sum: the gradients are made in forward and scaled in
    place by grad_output (one backward per forward). none: forward keeps the inputs and backward
    recomputes with the per-row grad_output."""

    @staticmethod
    def forward(ctx, *args):
        a = LinearArgs(*args)
        loss, kd, ce, gh, gw, gb = _linear_kd_loss_op(*a)
        ctx.dtypes = (a.hidden.dtype, a.weight.dtype)
        if a.reduction == "none":
            inputs = [getattr(a, name) for name in _TENSORS]
            ctx.present = tuple(t is not None for t in inputs)
            ctx.save_for_backward(*(t for t in inputs if t is not None))
        else:
            ctx.save_for_backward(gh, gw, gb)
        ctx.args = a._replace(**dict.fromkeys(_TENSORS))  # the scalars; the tensors go through saved_tensors
        ctx.mark_non_differentiable(kd, ce)
        ctx.set_materialize_grads(False)  # else backward gets zero tensors for the components' grads
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        if grad_loss is None:
            return _by_field()
        a = ctx.args
        want_h, want_w, want_b = a.grad_hidden, a.grad_weight, a.grad_bias  # as ``wanted``: bias checked
        hidden_dtype, weight_dtype = ctx.dtypes
        if a.reduction != "none":
            if getattr(ctx, "scaled", False):
                raise RuntimeError(f"linear_kd_loss: {TWICE}")
            ctx.scaled = True
            gh, gw, gb = ctx.saved_tensors
            # grad_output 1 (loss.backward()) leaves the gradients as they are: on the CPU that is known
            # without a device sync, and skips a pass over the [V, Hd] weight gradient.
            unit = grad_loss.device.type == "cpu" and not torch.compiler.is_compiling() and bool(grad_loss == 1)
            scaled = lambda grad, dtype: (grad if unit else scale_saved_(grad, grad_loss.to(grad.dtype))).to(dtype)  # noqa: E731
            return _by_field(
                hidden=scaled(gh, hidden_dtype) if want_h else None,
                weight=scaled(gw, weight_dtype) if want_w else None,
                bias=scaled(gb, weight_dtype) if want_b else None,
            )
        saved = iter(ctx.saved_tensors)
        a = a._replace(**{name: next(saved) for name, present in zip(_TENSORS, ctx.present) if present})
        gh, gw, gb = _linear_backward_rows_op(grad_loss, *a)
        return _by_field(
            hidden=gh if want_h else None,
            weight=gw.to(weight_dtype) if want_w else None,
            bias=gb.to(weight_dtype) if want_b else None,
        )


def _by_field(**grads) -> tuple:
    """Backward's return value: the given gradients by field name of ``LinearArgs``, None for every other."""
    return tuple(grads.get(name) for name in LinearArgs._fields)


def linear_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher: PseudoLabels | None = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 1.0,
    ignore_index: int = -100,
    token_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    t2_scale: bool = False,
    return_components: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """``kd_loss`` of the lm_head logits hidden·Wᵀ + b, computed chunk by chunk (no [N, V] logits).

    Args:
        hidden: [N, Hd] student hidden states (fp32/fp16/bf16; fp64 on "cpu"/"portable"/"torch").
        weight: [V, Hd] student lm_head weight, same dtype and device; bias: [V] or None.
        labels: [N] targets (already shifted), ``ignore_index`` marks rows without loss.
        teacher_hidden: [N, Hd_t] and teacher_weight: [V_t, Hd_t] (V_t >= V, rows beyond V unused),
            teacher_bias: [V_t] or None: the dense teacher's lm_head inputs (no gradient). Or
        teacher: ``PseudoLabels`` [N, k] (sparse teacher). Neither only with alpha=0 (CE alone).
        chunk_size: rows per chunk (default from V and, on CUDA, free memory: see
            ``default_chunk_size``); the [chunk, V] buffers are the only vocabulary-sized memory.
        temperature, alpha, beta, ignore_index, token_weights, reduction, t2_scale, return_components,
        backend: as in ``kd_loss``. backend "triton" runs the matmuls in torch and the row kernel in Triton.

    Returns:
        loss ([] fp32, or [N] for "none"), or (loss, kd, ce). Gradients flow to hidden, weight and bias.
    """
    checks.check_lm_head("", hidden, weight, bias, ref_name="hidden", ref=hidden)
    n, vocab = hidden.shape[0], weight.shape[0]
    dense = teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None
    if chunk_size is None:
        chunk_size = default_chunk_size(n, vocab, hidden.device, hidden.dtype)

    def check_own():
        if dense:
            if teacher_hidden is None or teacher_weight is None:
                raise ValueError("a dense teacher needs both teacher_hidden and teacher_weight")
            checks.check_lm_head(
                "teacher_",
                teacher_hidden,
                teacher_weight,
                teacher_bias,
                n_rows=n,
                student_vocab=vocab,
                ref_name="hidden",
                ref=hidden,
            )
        check_int("chunk_size", chunk_size, low=1)

    options = prepare_call(
        "linear_kd_loss",
        "hidden",
        hidden,
        vocab=vocab,
        labels=labels,
        token_weights=token_weights,
        teacher=teacher,
        has_dense=dense,
        check_own=check_own,
        temperature=temperature,
        alpha=alpha,
        beta=beta,
        ignore_index=ignore_index,
        reduction=reduction,
        t2_scale=t2_scale,
        backend=backend,
    )
    topk = (None, None, None) if teacher is None else (teacher.indices, teacher.logprobs, teacher.residual)
    if options.backend == "torch":
        return _reference(
            hidden,
            weight,
            labels,
            bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            teacher,
            token_weights,
            options,
            return_components,
        )

    grad_on = torch.is_grad_enabled()
    wanted = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    detach = lambda t: None if t is None else t.detach()  # noqa: E731  (the teacher gets no gradient)
    tensors = (
        hidden,
        weight,
        labels,
        bias,
        detach(teacher_hidden),
        detach(teacher_weight),
        detach(teacher_bias),
        *topk,
        token_weights,
    )
    args = LinearArgs.of(tensors, options, chunk_size=chunk_size, wanted=wanted)
    if any(wanted):
        loss, kd, ce = _LinearKDLoss.apply(*args)
    else:
        loss, kd, ce, *_ = _linear_kd_loss_op(*args)
    return (loss, kd, ce) if return_components else loss


def _reference(
    hidden,
    weight,
    labels,
    bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    teacher,
    token_weights,
    o: LossOptions,
    return_components: bool,
):
    """The "torch" backend: the value checks, then ``linear_kd_loss_reference`` (full [N, V] logits)."""
    vocab = weight.shape[0]
    teacher_logits = None
    # The logits are formed again for the value checks: this backend is the spec, not the fast path.
    with torch.no_grad():
        if teacher_weight is not None:
            teacher_logits = teacher_hidden @ teacher_weight[:vocab].t()
            if teacher_bias is not None:
                teacher_logits = teacher_logits + teacher_bias[:vocab]
        student_logits = hidden.detach() @ weight.detach().t()
        if bias is not None:
            student_logits = student_logits + bias.detach()
    topk = None if teacher is None else (teacher.indices, teacher.logprobs, teacher.residual)
    checks.check_values(
        labels, vocab, o.ignore_index, token_weights, topk, teacher_logits, student_logits, STUDENT_LOGITS
    )
    return linear_kd_loss_reference(
        hidden,
        weight,
        labels,
        bias=bias,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        teacher=teacher,
        temperature=o.temperature,
        alpha=o.alpha,
        beta=o.beta,
        ignore_index=o.ignore_index,
        token_weights=token_weights,
        reduction=o.reduction,
        t2_scale=o.t2_scale,
        return_components=return_components,
    )
