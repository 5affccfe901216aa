"""``linear_kd_loss``: the distillation loss fused with the lm_head, without [N, V] logits for the batch.

Tokens are processed in chunks of ``chunk_size`` rows. Per chunk (h = hidden[chunk]):

    logits   = h Wᵀ + b                       [chunk, V]   (torch matmul: cuBLAS / CPU BLAS)
    teacher  = h_t W_t[:V]ᵀ + b_t[:V]          [chunk, V]   (dense teacher; no gradient)
    KD_i, CE_i, dlogits  ← the row kernel, dlogits written over the logits buffer
    grad_hidden[chunk] = dlogits W,  grad_W += dlogitsᵀ h,  grad_b += Σ_rows dlogits

For mean/sum the gradients are complete after forward and backward only scales them, in place, by
grad_output (the approach of Liger-Kernel's fused linear losses); so one backward per forward
(retain_graph=True and a second backward raise). For reduction="none"
grad_output differs per row and cannot be applied afterwards to grad_W, so forward stores nothing
and backward recomputes the chunks with the row scales folded into the kernel's coefficients.
grad_W / grad_b accumulate in fp32 (for fp16/bf16 weights the accumulator is an extra fp32 [V, Hd]).
The [chunk, V] logits (and teacher logits) buffers are the only vocabulary-sized memory.
"""

from __future__ import annotations

import torch

from clinkd_kernels._dispatch import empty_output, resolve_backend
from clinkd_kernels._validation import check_int, check_same_device, check_shape, check_tensor
from clinkd_kernels.loss import _common as C
from clinkd_kernels.loss.kd_loss import rows_impl
from clinkd_kernels.loss.reference import linear_kd_loss_reference
from clinkd_kernels.topk.pseudo_labels import PseudoLabels

BACKENDS = ("triton", "cpu", "torch")
_ADDMM_OUT_DTYPE_OK: dict = {}  # device type → whether addmm(out_dtype=fp32, out=acc) works there


def _accumulate_wgrad(acc: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> None:
    """acc [V, Hd] += dlogitsᵀ h, with acc in fp32 and dlogits, h possibly fp16/bf16."""
    if dlogits.dtype == acc.dtype:
        acc.addmm_(dlogits.t(), h)
        return
    key = acc.device.type
    if _ADDMM_OUT_DTYPE_OK.get(key, key == "cuda"):
        try:  # cuBLAS accumulates the low-precision product straight into fp32
            torch.addmm(acc, dlogits.t(), h, out_dtype=acc.dtype, out=acc)
            _ADDMM_OUT_DTYPE_OK[key] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_OUT_DTYPE_OK[key] = False
    step = 8192  # vocabulary slices bound the low-precision temporary
    for a in range(0, acc.shape[0], step):
        acc[a:a + step].add_(dlogits[:, a:a + step].t() @ h)


def _run_chunks(hidden, weight, labels, bias, t_hidden, t_weight, t_bias, topk, *, coef_kd, coef_ce, inv_t,
                ignore_index, chunk, backend, grad_hidden, grad_weight, grad_bias):
    """Chunk loop. Returns (kd_rows [N], ce_rows [N], grad_hidden | None, grad_W fp32 | None, grad_b fp32 | None)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = rows_impl(backend)
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    kd_rows = empty_output((n,), dtype=acc_dtype, device=hidden.device)
    ce_rows = empty_output((n,), dtype=acc_dtype, device=hidden.device)
    need_grad = grad_hidden or grad_weight or grad_bias
    gh = empty_output(hidden.shape, dtype=hidden.dtype, device=hidden.device) if grad_hidden else None
    acc_w = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    gw = torch.zeros(weight.shape, dtype=acc_w, device=weight.device) if grad_weight else None
    gb = torch.zeros(vocab, dtype=acc_w, device=weight.device) if grad_bias else None
    tw = None if t_weight is None else t_weight[:vocab]
    tb = None if t_bias is None else t_bias[:vocab]
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        h = hidden[a:b]
        logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
        t_logits = None
        if tw is not None:
            th = t_hidden[a:b]
            t_logits = th @ tw.t() if tb is None else torch.addmm(tb, th, tw.t())
        rows(logits, labels[a:b], teacher_logits=t_logits,
             topk=None if topk is None else tuple(x[a:b] for x in topk), inv_t=inv_t, ignore_index=ignore_index,
             coef_kd=coef_kd[a:b], coef_ce=coef_ce[a:b], kd_out=kd_rows[a:b], ce_out=ce_rows[a:b],
             grad_out=logits if need_grad else None)  # the gradient overwrites the chunk's logits
        del t_logits
        if grad_hidden:
            torch.mm(logits, weight, out=gh[a:b])
        if grad_weight:
            _accumulate_wgrad(gw, logits, h)
        if grad_bias:
            gb.add_(logits.sum(0, dtype=acc_w))
        del logits
    return kd_rows, ce_rows, gh, gw, gb


def _empty_like_none(x):
    return x.new_empty(0)


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
    topk = None if topk_indices is None else (topk_indices, topk_logprobs, topk_residual)
    C.check_values(labels, weight.shape[0], ignore_index, token_weights, topk)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    coef_kd, coef_ce, kd_scale, ce_scale = C.coefficients(
        labels, token_weights, ignore_index=ignore_index, temperature=temperature, alpha=alpha, beta=beta,
        reduction=reduction, t2_scale=t2_scale, dtype=acc)
    keep = reduction != "none"
    kd_rows, ce_rows, gh, gw, gb = _run_chunks(
        hidden, weight, labels, bias, teacher_hidden, teacher_weight, teacher_bias, topk, coef_kd=coef_kd,
        coef_ce=coef_ce, inv_t=1.0 / temperature, ignore_index=ignore_index, chunk=chunk_size, backend=backend,
        grad_hidden=keep and grad_hidden, grad_weight=keep and grad_weight, grad_bias=keep and grad_bias and bias is not None)
    loss, kd, ce = C.assemble(kd_rows, ce_rows, kd_scale, ce_scale, alpha=alpha, beta=beta, reduction=reduction)
    return (loss, kd, ce, gh if gh is not None else _empty_like_none(hidden),
            gw if gw is not None else _empty_like_none(kd_rows), gb if gb is not None else _empty_like_none(kd_rows))


def _grad_shapes(hidden, weight, bias, reduction, grad_hidden, grad_weight, grad_bias):
    keep = reduction != "none"
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    wacc = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    gh = hidden.new_empty(hidden.shape if keep and grad_hidden else (0,))
    gw = weight.new_empty(weight.shape if keep and grad_weight else (0,), dtype=wacc if keep and grad_weight else acc)
    gb = weight.new_empty((weight.shape[0],) if keep and grad_bias and bias is not None else (0,),
                          dtype=wacc if keep and grad_bias and bias is not None else acc)
    return gh, gw, gb


@_linear_kd_loss_op.register_fake
def _(hidden, weight, labels, bias, teacher_hidden, teacher_weight, teacher_bias, topk_indices, topk_logprobs,
      topk_residual, token_weights, temperature, alpha, beta, ignore_index, reduction, t2_scale, chunk_size,
      grad_hidden, grad_weight, grad_bias, backend):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    shape = (hidden.shape[0],) if reduction == "none" else ()
    loss, kd, ce = (hidden.new_empty(shape, dtype=acc) for _ in range(3))
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
    topk = None if topk_indices is None else (topk_indices, topk_logprobs, topk_residual)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    coef_kd, coef_ce, _, _ = C.coefficients(labels, token_weights, ignore_index=ignore_index,
                                            temperature=temperature, alpha=alpha, beta=beta, reduction="none",
                                            t2_scale=t2_scale, dtype=acc)
    g = grad_loss.to(acc)
    _, _, gh, gw, gb = _run_chunks(
        hidden, weight, labels, bias, teacher_hidden, teacher_weight, teacher_bias, topk, coef_kd=coef_kd * g,
        coef_ce=coef_ce * g, inv_t=1.0 / temperature, ignore_index=ignore_index, chunk=chunk_size, backend=backend,
        grad_hidden=grad_hidden, grad_weight=grad_weight, grad_bias=grad_bias and bias is not None)
    return (gh if gh is not None else hidden.new_empty(0),
            gw if gw is not None else hidden.new_empty(0, dtype=acc),
            gb if gb is not None else hidden.new_empty(0, dtype=acc))


@_linear_backward_rows_op.register_fake
def _(grad_loss, hidden, weight, labels, bias, teacher_hidden, teacher_weight, teacher_bias, topk_indices,
      topk_logprobs, topk_residual, token_weights, temperature, alpha, beta, ignore_index, t2_scale, chunk_size,
      grad_hidden, grad_weight, grad_bias, backend):
    return _grad_shapes(hidden, weight, bias, "sum", grad_hidden, grad_weight, grad_bias)


_ARGS = ("hidden", "weight", "labels", "bias", "teacher_hidden", "teacher_weight", "teacher_bias", "topk_indices",
         "topk_logprobs", "topk_residual", "token_weights", "temperature", "alpha", "beta", "ignore_index",
         "reduction", "t2_scale", "chunk_size", "grad_hidden", "grad_weight", "grad_bias", "backend")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_ARGS, inputs))
    ctx.reduction = args["reduction"]
    ctx.hidden_dtype, ctx.weight_dtype = args["hidden"].dtype, args["weight"].dtype
    ctx.has_bias = args["bias"] is not None
    if ctx.reduction == "none":
        ctx.args = {k: v for k, v in args.items() if not isinstance(v, torch.Tensor)}
        ctx.save_for_backward(*(args[k] for k in _ARGS[:11] if args[k] is not None))
        ctx.present = tuple(args[k] is not None for k in _ARGS[:11])
    else:
        ctx.save_for_backward(output[3], output[4], output[5])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # else backward gets zero tensors shaped like grad_W for those outputs


def _scaled(grad, g, dtype, wanted):
    """grad·g, in place: a copy would double the [V, Hd] weight gradient at the peak of backward."""
    return C.scale_saved_(grad, g.to(grad.dtype)).to(dtype) if wanted and grad.numel() else None


def _backward(ctx, grad_loss, *_unused):
    n_inputs = len(_ARGS)
    if grad_loss is None:
        return (None,) * n_inputs
    if ctx.reduction != "none":
        if getattr(ctx, "scaled", False):
            raise RuntimeError("linear_kd_loss: a second backward through the same graph (retain_graph=True) is not "
                               "supported: the gradients were computed in forward and scaled in place by the first")
        ctx.scaled = True
        gh, gw, gb = ctx.saved_tensors
        out = [None] * n_inputs
        out[0] = _scaled(gh, grad_loss, ctx.hidden_dtype, ctx.needs_input_grad[0])
        out[1] = _scaled(gw, grad_loss, ctx.weight_dtype, ctx.needs_input_grad[1])
        out[3] = _scaled(gb, grad_loss, ctx.weight_dtype, ctx.has_bias and ctx.needs_input_grad[3])
        return tuple(out)
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if present else None for present in ctx.present]
    a = ctx.args
    gh, gw, gb = _linear_backward_rows_op(
        grad_loss, *tensors[:3], *tensors[3:11], a["temperature"], a["alpha"], a["beta"], a["ignore_index"],
        a["t2_scale"], a["chunk_size"], ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        ctx.has_bias and ctx.needs_input_grad[3], a["backend"])
    out = [None] * n_inputs
    out[0] = gh if ctx.needs_input_grad[0] else None
    out[1] = gw.to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
    out[3] = gb.to(ctx.weight_dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return tuple(out)


torch.library.register_autograd("clinkd::linear_kd_loss", _backward, setup_context=_setup_context)


def linear_kd_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias: torch.Tensor | None = None,
                   teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                   teacher_bias: torch.Tensor | None = None, teacher: PseudoLabels | None = None,
                   temperature: float = 1.0, alpha: float = 0.5, beta: float = 1.0, ignore_index: int = -100,
                   token_weights: torch.Tensor | None = None, reduction: str = "mean", t2_scale: bool = False,
                   return_components: bool = False, chunk_size: int | None = None, backend: str | None = None):
    """``kd_loss`` of the lm_head logits hidden·Wᵀ + b, computed chunk by chunk (no [N, V] logits).

    Args:
        hidden: [N, Hd] student hidden states (fp32/fp16/bf16; fp64 on "cpu"/"torch").
        weight: [V, Hd] student lm_head weight, same dtype and device; bias: [V] or None.
        labels: [N] targets (already shifted), ``ignore_index`` marks rows without loss.
        teacher_hidden: [N, Hd_t] and teacher_weight: [V_t, Hd_t] (V_t >= V, rows beyond V unused),
            teacher_bias: [V_t] or None: the dense teacher's lm_head inputs (no gradient). Or
        teacher: ``PseudoLabels`` [N, k] (sparse teacher). Neither only with alpha=0 (CE alone).
        chunk_size: rows per chunk (default from V and, on CUDA, free memory: see
            ``_common.default_chunk_size``); the [chunk, V] buffers are the only vocabulary-sized memory.
        temperature, alpha, beta, ignore_index, token_weights, reduction, t2_scale, return_components,
        backend: as in ``kd_loss``. backend "triton" runs the matmuls in torch and the row kernel in Triton.

    Returns:
        loss ([] fp32, or [N] for "none"), or (loss, kd, ce). Gradients flow to hidden, weight and bias.
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=C.REFERENCE_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=C.REFERENCE_DTYPES)
    n, hd = hidden.shape
    vocab = weight.shape[0]
    check_shape("weight", weight, [None, hd])
    if vocab == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    check_same_device(hidden=hidden, weight=weight)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_shape("bias", bias, [vocab])
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
        check_same_device(hidden=hidden, bias=bias)
    temperature, alpha, beta = C.check_options(temperature, alpha, beta, ignore_index, reduction)
    C.check_labels(labels, n, "hidden", hidden)
    C.check_token_weights(token_weights, n, "hidden", hidden)
    dense = teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None
    C.check_teacher_choice(alpha, dense, teacher)
    if dense:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("a dense teacher needs both teacher_hidden and teacher_weight")
        check_tensor("teacher_hidden", teacher_hidden, ndim=2, dtypes=C.REFERENCE_DTYPES)
        check_tensor("teacher_weight", teacher_weight, ndim=2, dtypes=C.REFERENCE_DTYPES)
        check_shape("teacher_hidden", teacher_hidden, [n, None])
        check_shape("teacher_weight", teacher_weight, [None, teacher_hidden.shape[1]])
        if teacher_weight.shape[0] < vocab:
            raise ValueError(f"teacher_weight must have at least the student's V={vocab} rows, "
                             f"got {teacher_weight.shape[0]}")
        if teacher_weight.dtype != teacher_hidden.dtype:
            raise TypeError(f"teacher_weight must have the dtype of teacher_hidden ({teacher_hidden.dtype}), "
                            f"got {teacher_weight.dtype}")
        check_same_device(hidden=hidden, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
        if teacher_bias is not None:
            check_tensor("teacher_bias", teacher_bias, ndim=1)
            check_shape("teacher_bias", teacher_bias, [teacher_weight.shape[0]])
            if teacher_bias.dtype != teacher_hidden.dtype:
                raise TypeError(f"teacher_bias must have the dtype of teacher_hidden ({teacher_hidden.dtype}), "
                                f"got {teacher_bias.dtype}")
            check_same_device(hidden=hidden, teacher_bias=teacher_bias)
    if teacher is not None:
        C.check_pseudo_labels_shapes(teacher, n, vocab, "hidden", hidden)
    if chunk_size is None:
        chunk_size = C.default_chunk_size(n, vocab, hidden.device, hidden.dtype)
    check_int("chunk_size", chunk_size, low=1)

    backend = resolve_backend("linear_kd_loss", backend, hidden.device, BACKENDS)
    if backend == "torch":
        C.check_values(labels, vocab, ignore_index, token_weights,
                       None if teacher is None else (teacher.indices, teacher.logprobs, teacher.residual))
        return linear_kd_loss_reference(
            hidden, weight, labels, bias=bias, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
            teacher_bias=teacher_bias, teacher=teacher, temperature=temperature, alpha=alpha, beta=beta,
            ignore_index=ignore_index, token_weights=token_weights, reduction=reduction, t2_scale=t2_scale,
            return_components=return_components)
    if backend == "triton" and hidden.dtype == torch.float64:
        raise TypeError("hidden must be fp32/fp16/bf16 for the triton backend, got float64")

    grad_on = torch.is_grad_enabled()
    idx = lp = res = None
    if teacher is not None:
        idx, lp, res = teacher.indices, teacher.logprobs, teacher.residual
    loss, kd, ce, *_ = _linear_kd_loss_op(
        hidden, weight, labels, bias, teacher_hidden.detach() if teacher_hidden is not None else None,
        teacher_weight.detach() if teacher_weight is not None else None,
        teacher_bias.detach() if teacher_bias is not None else None, idx, lp, res, token_weights, temperature,
        alpha, beta, ignore_index, reduction, t2_scale, chunk_size, grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad, grad_on and bias is not None and bias.requires_grad, backend)
    return (loss, kd, ce) if return_components else loss
