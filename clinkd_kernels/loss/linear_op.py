"""``linear_kd_loss``: the distillation loss fused with the lm_head, without [N, V] logits for the batch:
the public function, its checks, the chunk loop, the custom ops and the autograd.

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

import torch

from .._dispatch import resolve_backend
from .._memory import empty_output
from .._validation import check_int
from ..topk import PseudoLabels
from . import checks
from .reference import linear_kd_loss_reference
from .rows import (BACKENDS, TWICE, LossOptions, accumulate_dtype, assemble, coefficients, rows_function,
                   scale_saved_, topk_fields)


def default_chunk_size(n_rows: int, vocab: int, device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """Rows per chunk so that one [chunk, V] logits buffer is about 128 MiB on CPU (fp32 compute; the row
    path's own temporaries are bounded separately) or 512 MiB on CUDA (logits in ``dtype``), capped by
    1/16 of the free GPU memory; a power of two in [16, 4096], never above n_rows rounded up to a power of two.

    The lm_head matmuls want many rows: below ~1024 rows a GPU matmul against a Qwen-size vocabulary
    turns weight-bandwidth-bound, and CPU BLAS here ran 3-4x slower at 32 rows than at 1024.
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
    NaN included), so it is never zero-filled: that fill was a tenth of the CPU loss at Qwen's V."""
    beta = 0.0 if first else 1.0
    if dlogits.dtype == acc.dtype:
        if first:  # mm into the buffer: addmm_ with beta = 0 ran 1.4-1.8x slower on CPU BLAS at [152k, 1536]
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
        part = dlogits[:, a:a + step].t() @ h
        if first:
            acc[a:a + step].copy_(part)
        else:
            acc[a:a + step].add_(part)


def _lm_head(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, out: torch.Tensor) -> torch.Tensor:
    """out [rows, V] = h Wᵀ (+ b), written into the chunk buffer; returns out."""
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _weight_grad_dtype(weight: torch.Tensor) -> torch.dtype:
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def _run_chunks(hidden, weight, labels, bias, t_hidden, t_weight, t_bias, topk, *, coef_kd, coef_ce, inv_t,
                ignore_index, chunk, backend, grad_hidden, grad_weight, grad_bias):
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
    # every chunk: a fresh buffer per chunk paid its page faults again each time (on the CPU a fresh
    # 78 MiB buffer at Qwen's V cost a tenth of the matmul that fills it). Not kept after the call: held
    # in the buffer cache they stayed resident through the model's backward (+157 MiB, a third of a
    # scaled-down training step's peak) for no time measurably saved.
    rows_max = min(chunk, n)
    logits_buf = empty_output((rows_max, vocab), dtype=hidden.dtype, device=hidden.device, huge_pages=True)
    t_buf = None
    if tw is not None:
        if n <= chunk and gw is not None and gw.dtype == t_hidden.dtype and rows_max * vocab <= gw.numel():
            # One chunk: grad_W is not written before the teacher's logits are spent, so they live in
            # its buffer (rows·V <= V·Hd elements). Peak memory is then grad_W + one [rows, V] buffer,
            # the least a chunk needs, also when grad_W's buffer is a cached one resident before the call.
            t_buf = gw.view(-1)[:rows_max * vocab].view(rows_max, vocab)
        else:
            t_buf = empty_output((rows_max, vocab), dtype=t_hidden.dtype, device=hidden.device, huge_pages=True)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        h = hidden[a:b]
        logits = _lm_head(h, weight, bias, out=logits_buf[:b - a])
        t_logits = None if tw is None else _lm_head(t_hidden[a:b], tw, tb, out=t_buf[:b - a])
        rows(logits, labels[a:b], teacher_logits=t_logits,
             topk=None if topk is None else tuple(x[a:b] for x in topk), inv_t=inv_t, ignore_index=ignore_index,
             coef_kd=coef_kd[a:b], coef_ce=coef_ce[a:b], kd_out=kd_rows[a:b], ce_out=ce_rows[a:b],
             grad_out=logits if need_grad else None)  # the gradient overwrites the chunk's logits
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


def _run_valid_rows(hidden, weight, labels, bias, t_hidden, t_weight, t_bias, topk, *, coef_kd, coef_ce,
                    ignore_index, **kw):
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
        return _run_chunks(hidden, weight, labels, bias, t_hidden, t_weight, t_bias, topk, coef_kd=coef_kd,
                           coef_ce=coef_ce, ignore_index=ignore_index, **kw)
    rows = valid.nonzero().squeeze(1)
    pick = lambda t: None if t is None else t.index_select(0, rows)  # noqa: E731
    kd_v, ce_v, gh_v, gw, gb = _run_chunks(
        pick(hidden), weight, pick(labels), bias, pick(t_hidden), t_weight, t_bias,
        None if topk is None else tuple(pick(x) for x in topk), coef_kd=pick(coef_kd), coef_ce=pick(coef_ce),
        ignore_index=ignore_index, **kw)
    kd_rows = kd_v.new_zeros(n).index_copy_(0, rows, kd_v)
    ce_rows = ce_v.new_zeros(n).index_copy_(0, rows, ce_v)
    gh = None if gh_v is None else gh_v.new_zeros(hidden.shape).index_copy_(0, rows, gh_v)
    return kd_rows, ce_rows, gh, gw, gb


def _check_dense_teacher(kd_rows, labels, ignore_index, teacher_hidden, teacher_weight, teacher_bias, vocab):
    """A valid row whose dense teacher has no distribution (NaN, +inf, all −inf logits) has a NaN KD_i, and
    so has a row whose student logits hold NaN or +inf (an undefined softmax, reported as NaN as by
    kd_loss). One host sync on the [N] KD values, no pass over the logits; only on that error path are
    the teacher logits of the NaN rows formed again, to tell the two apart."""
    nan_rows = (labels != ignore_index) & torch.isnan(kd_rows)
    if not bool(nan_rows.any()):
        return
    rows = nan_rows.nonzero().squeeze(1)
    t_logits = teacher_hidden[rows] @ teacher_weight[:vocab].t()
    if teacher_bias is not None:
        t_logits = t_logits + teacher_bias[:vocab]
    bad = torch.zeros_like(nan_rows)
    bad[rows] = checks.bad_teacher_rows(t_logits, labels[rows], vocab, ignore_index)
    if bool(bad.any()):
        raise ValueError(checks.bad_teacher_message(bad))


def _or_empty(grad, like, dtype=None):
    """A gradient not computed travels through the op schema as an empty tensor."""
    return grad if grad is not None else like.new_empty(0, dtype=dtype)


@torch.library.custom_op("clinkd::linear_kd_loss", mutates_args=())
def _linear_kd_loss_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
                       teacher_hidden: torch.Tensor | None, teacher_weight: torch.Tensor | None,
                       teacher_bias: torch.Tensor | None, topk_indices: torch.Tensor | None,
                       topk_logprobs: torch.Tensor | None, topk_residual: torch.Tensor | None,
                       token_weights: torch.Tensor | None, temperature: float, alpha: float, beta: float,
                       ignore_index: int, reduction: str, t2_scale: bool, chunk_size: int, grad_hidden: bool,
                       grad_weight: bool, grad_bias: bool, backend: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kd, ce, grad_hidden, grad_weight fp32, grad_bias fp32); a gradient not asked for is [0].
    With reduction="none" no gradient is computed here (backward recomputes)."""
    topk = topk_fields(topk_indices, topk_logprobs, topk_residual)
    checks.check_values(labels, weight.shape[0], ignore_index, token_weights, topk)
    coef_kd, coef_ce, kd_scale, ce_scale = coefficients(
        labels, token_weights, ignore_index=ignore_index, temperature=temperature, alpha=alpha, beta=beta,
        reduction=reduction, t2_scale=t2_scale, dtype=accumulate_dtype(hidden))
    keep = reduction != "none"
    kd_rows, ce_rows, gh, gw, gb = _run_valid_rows(
        hidden, weight, labels, bias, teacher_hidden, teacher_weight, teacher_bias, topk, coef_kd=coef_kd,
        coef_ce=coef_ce, inv_t=1.0 / temperature, ignore_index=ignore_index, chunk=chunk_size, backend=backend,
        grad_hidden=keep and grad_hidden, grad_weight=keep and grad_weight,
        grad_bias=keep and grad_bias and bias is not None)
    if teacher_weight is not None:
        _check_dense_teacher(kd_rows, labels, ignore_index, teacher_hidden, teacher_weight, teacher_bias,
                             weight.shape[0])
    loss, kd, ce = assemble(kd_rows, ce_rows, kd_scale, ce_scale, alpha=alpha, beta=beta, reduction=reduction)
    return loss, kd, ce, _or_empty(gh, hidden), _or_empty(gw, kd_rows), _or_empty(gb, kd_rows)


def _grad_shapes(hidden, weight, bias, reduction, grad_hidden, grad_weight, grad_bias):
    keep = reduction != "none"
    acc, wacc = accumulate_dtype(hidden), _weight_grad_dtype(weight)
    with_bias = keep and grad_bias and bias is not None
    gh = hidden.new_empty(hidden.shape if keep and grad_hidden else (0,))
    gw = weight.new_empty(weight.shape if keep and grad_weight else (0,), dtype=wacc if keep and grad_weight else acc)
    gb = weight.new_empty((weight.shape[0],) if with_bias else (0,), dtype=wacc if with_bias else acc)
    return gh, gw, gb


@_linear_kd_loss_op.register_fake
def _(hidden, weight, labels, bias, teacher_hidden, teacher_weight, teacher_bias, topk_indices, topk_logprobs,
      topk_residual, token_weights, temperature, alpha, beta, ignore_index, reduction, t2_scale, chunk_size,
      grad_hidden, grad_weight, grad_bias, backend):
    shape = (hidden.shape[0],) if reduction == "none" else ()
    loss, kd, ce = (hidden.new_empty(shape, dtype=accumulate_dtype(hidden)) for _ in range(3))
    return (loss, kd, ce) + _grad_shapes(hidden, weight, bias, reduction, grad_hidden, grad_weight, grad_bias)


@torch.library.custom_op("clinkd::linear_kd_loss_backward_rows", mutates_args=())
def _linear_backward_rows_op(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                             labels: torch.Tensor, bias: torch.Tensor | None, teacher_hidden: torch.Tensor | None,
                             teacher_weight: torch.Tensor | None, teacher_bias: torch.Tensor | None,
                             topk_indices: torch.Tensor | None, topk_logprobs: torch.Tensor | None,
                             topk_residual: torch.Tensor | None, token_weights: torch.Tensor | None,
                             temperature: float, alpha: float, beta: float, ignore_index: int, t2_scale: bool,
                             chunk_size: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool, backend: str
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of reduction="none": recompute the chunks with coefficients scaled by grad_loss [N]."""
    acc = accumulate_dtype(hidden)
    coef_kd, coef_ce, _, _ = coefficients(labels, token_weights, ignore_index=ignore_index, temperature=temperature,
                                          alpha=alpha, beta=beta, reduction="none", t2_scale=t2_scale, dtype=acc)
    g = grad_loss.to(acc)
    _, _, gh, gw, gb = _run_valid_rows(
        hidden, weight, labels, bias, teacher_hidden, teacher_weight, teacher_bias,
        topk_fields(topk_indices, topk_logprobs, topk_residual), coef_kd=coef_kd * g, coef_ce=coef_ce * g,
        inv_t=1.0 / temperature, ignore_index=ignore_index, chunk=chunk_size, backend=backend,
        grad_hidden=grad_hidden, grad_weight=grad_weight, grad_bias=grad_bias and bias is not None)
    return _or_empty(gh, hidden), _or_empty(gw, hidden, acc), _or_empty(gb, hidden, acc)


@_linear_backward_rows_op.register_fake
def _(grad_loss, hidden, weight, labels, bias, teacher_hidden, teacher_weight, teacher_bias, topk_indices,
      topk_logprobs, topk_residual, token_weights, temperature, alpha, beta, ignore_index, t2_scale, chunk_size,
      grad_hidden, grad_weight, grad_bias, backend):
    return _grad_shapes(hidden, weight, bias, "sum", grad_hidden, grad_weight, grad_bias)


# The inputs of _LinearKDLoss.forward after ctx, in order: backward returns one gradient (or None) each.
_INPUTS = ("hidden", "weight", "bias", "labels", "teacher_hidden", "teacher_weight", "teacher_bias", "topk_indices",
           "topk_logprobs", "topk_residual", "token_weights", "options", "chunk_size", "wanted")


def _gradients(**grads) -> tuple:
    """Backward's return value: the given gradients by input name, None for every other input."""
    return tuple(grads.get(name) for name in _INPUTS)


class _LinearKDLoss(torch.autograd.Function):
    """mean/sum: the gradients are made in forward and scaled in place by grad_output (one backward per
    forward). none: forward keeps the inputs and backward recomputes with the per-row grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teacher_hidden, teacher_weight, teacher_bias, topk_indices,
                topk_logprobs, topk_residual, token_weights, options: LossOptions, chunk_size: int,
                wanted: tuple[bool, bool, bool]):
        o = options
        loss, kd, ce, gh, gw, gb = _linear_kd_loss_op(
            hidden, weight, labels, bias, teacher_hidden, teacher_weight, teacher_bias, topk_indices, topk_logprobs,
            topk_residual, token_weights, o.temperature, o.alpha, o.beta, o.ignore_index, o.reduction, o.t2_scale,
            chunk_size, *wanted, o.backend)
        ctx.options, ctx.chunk_size, ctx.wanted = o, chunk_size, wanted
        ctx.dtypes = (hidden.dtype, weight.dtype)
        if o.reduction == "none":
            inputs = (hidden, weight, labels, bias, teacher_hidden, teacher_weight, teacher_bias, topk_indices,
                      topk_logprobs, topk_residual, token_weights)
            ctx.present = tuple(t is not None for t in inputs)
            ctx.save_for_backward(*(t for t in inputs if t is not None))
        else:
            ctx.save_for_backward(gh, gw, gb)
        ctx.mark_non_differentiable(kd, ce)
        ctx.set_materialize_grads(False)  # else backward gets zero tensors for the components' grads
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        if grad_loss is None:
            return _gradients()
        o = ctx.options
        want_h, want_w, want_b = ctx.wanted
        hidden_dtype, weight_dtype = ctx.dtypes
        if o.reduction != "none":
            if getattr(ctx, "scaled", False):
                raise RuntimeError(f"linear_kd_loss: {TWICE}")
            ctx.scaled = True
            gh, gw, gb = ctx.saved_tensors
            # grad_output 1 (loss.backward()) leaves the gradients as they are: on the CPU that is known
            # without a device sync, and skips a pass over [V, Hd] (a tenth of the step at Qwen's V).
            unit = grad_loss.device.type == "cpu" and not torch.compiler.is_compiling() and bool(grad_loss == 1)
            scaled = lambda grad, dtype: (grad if unit else scale_saved_(grad, grad_loss.to(grad.dtype))).to(dtype)  # noqa: E731
            return _gradients(hidden=scaled(gh, hidden_dtype) if want_h else None,
                              weight=scaled(gw, weight_dtype) if want_w else None,
                              bias=scaled(gb, weight_dtype) if want_b else None)
        saved = iter(ctx.saved_tensors)
        (hidden, weight, labels, bias, teacher_hidden, teacher_weight, teacher_bias, topk_indices, topk_logprobs,
         topk_residual, token_weights) = (next(saved) if present else None for present in ctx.present)
        gh, gw, gb = _linear_backward_rows_op(
            grad_loss, hidden, weight, labels, bias, teacher_hidden, teacher_weight, teacher_bias, topk_indices,
            topk_logprobs, topk_residual, token_weights, o.temperature, o.alpha, o.beta, o.ignore_index,
            o.t2_scale, ctx.chunk_size, want_h, want_w, want_b, o.backend)
        return _gradients(hidden=gh if want_h else None, weight=gw.to(weight_dtype) if want_w else None,
                          bias=gb.to(weight_dtype) if want_b else None)


def linear_kd_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias: torch.Tensor | None = None,
                   teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                   teacher_bias: torch.Tensor | None = None, teacher: PseudoLabels | None = None,
                   temperature: float = 1.0, alpha: float = 0.5, beta: float = 1.0, ignore_index: int = -100,
                   token_weights: torch.Tensor | None = None, reduction: str = "mean", t2_scale: bool = False,
                   return_components: bool = False, chunk_size: int | None = None, backend: str | None = None):
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
    temperature, alpha, beta = checks.check_options(temperature, alpha, beta, ignore_index, reduction)
    checks.check_rows(labels, token_weights, n, "hidden", hidden)
    dense = teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None
    checks.check_teacher(alpha, dense, teacher, n_rows=n, vocab=vocab, ref_name="hidden", ref=hidden)
    if dense:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("a dense teacher needs both teacher_hidden and teacher_weight")
        checks.check_lm_head("teacher_", teacher_hidden, teacher_weight, teacher_bias, n_rows=n, student_vocab=vocab,
                             ref_name="hidden", ref=hidden)
    if chunk_size is None:
        chunk_size = default_chunk_size(n, vocab, hidden.device, hidden.dtype)
    check_int("chunk_size", chunk_size, low=1)

    backend = resolve_backend("linear_kd_loss", backend, hidden.device, BACKENDS, needs_extension_on_cpu=True)
    topk = (None, None, None) if teacher is None else (teacher.indices, teacher.logprobs, teacher.residual)
    if backend == "torch":
        teacher_logits = None
        if dense:  # the reference forms them again: this backend is the spec, not the fast path
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight[:vocab].t()
                if teacher_bias is not None:
                    teacher_logits = teacher_logits + teacher_bias[:vocab]
        checks.check_values(labels, vocab, ignore_index, token_weights, None if teacher is None else topk,
                            teacher_logits)
        return linear_kd_loss_reference(
            hidden, weight, labels, bias=bias, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
            teacher_bias=teacher_bias, teacher=teacher, temperature=temperature, alpha=alpha, beta=beta,
            ignore_index=ignore_index, token_weights=token_weights, reduction=reduction, t2_scale=t2_scale,
            return_components=return_components)
    if backend == "triton" and hidden.dtype == torch.float64:
        raise TypeError("hidden must be fp32/fp16/bf16 for the triton backend, got float64")

    grad_on = torch.is_grad_enabled()
    wanted = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
              grad_on and bias is not None and bias.requires_grad)
    detach = lambda t: None if t is None else t.detach()  # noqa: E731  (the teacher gets no gradient)
    options = LossOptions(temperature, alpha, beta, ignore_index, reduction, t2_scale, backend)
    args = (hidden, weight, bias, labels, detach(teacher_hidden), detach(teacher_weight), detach(teacher_bias),
            *topk, token_weights)
    if any(wanted):
        loss, kd, ce = _LinearKDLoss.apply(*args, options, chunk_size, wanted)
    else:
        loss, kd, ce, *_ = _linear_kd_loss_op(
            hidden, weight, labels, bias, *args[4:], temperature, alpha, beta, ignore_index, reduction, t2_scale,
            chunk_size, False, False, False, backend)
    return (loss, kd, ce) if return_components else loss
