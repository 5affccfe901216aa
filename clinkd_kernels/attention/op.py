"""``mcg_rope_attention``: the public function, backend dispatch and the custom ops (with autograd) of the
Triton path; the argument checks are ``checks.py``'s.

Contract (docs/api.md):
    padded: q [B,S,Hq,D], k/v [B,S,Hkv,D], position_ids [3,B,S], attention_mask [B,S] (≠0 keep, 0 pad) → [B,S,Hq,D]
    packed: q [T,Hq,D],   k/v [T,Hkv,D],   position_ids [3,T],   cu_seqlens int32 [B+1]             → [T,Hq,D]
    out = softmax(rope(q)·rope(k)ᵀ·scale + masks)·v, rope = M-RoPE with angles position·inv_freq (fp32);
    Hq % Hkv == 0, D ∈ {64, 72, 80, 96, 128}; gradients for the pre-rotary q, k and for v; the rotary layout
    (contiguous or interleaved sections) reaches the kernels as an int32 [D/2] axis vector.

The Triton path works on flattened tokens (T_total = B·S or T); the two custom ops
``clinkd::mcg_rope_attention_fwd`` / ``_bwd`` take those flat views, so the reshapes around them stay
visible to torch.compile. Checks that need tensor values (q, k, v finite; cu_seqlens order and ends)
run inside the ops, i.e. eagerly, so tracing needs no data-dependent Python.
"""

from __future__ import annotations

import torch

from .._dispatch import resolve_backend, triton_interpret
from ..rope.layout import axis_tensor
from .checks import check_inputs, check_values


# --------------------------------------------------------------------------------------------------
# custom ops (Triton path) on flat tensors: q [N,Hq,D], k/v [N,Hkv,D], pos int64 [3,N], mask int8 [N]
# --------------------------------------------------------------------------------------------------
def _grid_len(q, cu_seqlens, seqlen: int, max_seqlen: int) -> int:
    """The longest sequence (the kernels' grid rows) of flat q [N,Hq,D]: ``seqlen`` in the padded form, else
    ``max_seqlen`` or, when that is <= 0, the longest of cu_seqlens int32 [B+1] (one host sync)."""
    if cu_seqlens is None:
        longest = seqlen
    else:
        longest = max_seqlen if max_seqlen > 0 else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    # Row offsets inside a sequence are 32-bit in the kernels.
    if longest * q.shape[1] * q.shape[2] >= 2**31:
        raise ValueError(
            f"sequences of {longest} tokens × {q.shape[1]} heads × {q.shape[2]} dims exceed 2^31 elements; split them"
        )
    return longest


@torch.library.custom_op("clinkd::mcg_rope_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    inv_freq: torch.Tensor,
    axis: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    causal: bool,
    scale: float,
    batch: int,
    seqlen: int,
    max_seqlen: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [N,Hq,D], lse fp32 [Hq,N]); axis int32 [D/2] (the rotary layout); max_seqlen ≤ 0 means "read
    it from cu_seqlens"."""
    from .launch import attention_forward

    longest = check_values(q, k, v, cu_seqlens, max_seqlen if max_seqlen > 0 else None, seqlen=seqlen)
    longest = _grid_len(q, cu_seqlens, seqlen, longest or 0)
    return attention_forward(
        q,
        k,
        v,
        pos,
        inv_freq,
        axis,
        mask,
        cu_seqlens,
        causal=causal,
        scale=scale,
        batch=batch,
        seqlen=seqlen,
        max_seqlen=longest,
    )


@_fwd_op.register_fake
def _(q, k, v, pos, inv_freq, axis, mask, cu_seqlens, causal, scale, batch, seqlen, max_seqlen):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("clinkd::mcg_rope_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    pos: torch.Tensor,
    inv_freq: torch.Tensor,
    axis: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    causal: bool,
    scale: float,
    batch: int,
    seqlen: int,
    max_seqlen: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for the pre-rotary q, k and for v."""
    from .launch import attention_backward

    longest = _grid_len(q, cu_seqlens, seqlen, max_seqlen)
    return attention_backward(
        grad_out.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        pos,
        inv_freq,
        axis,
        mask,
        cu_seqlens,
        causal=causal,
        scale=scale,
        batch=batch,
        seqlen=seqlen,
        max_seqlen=longest,
    )


@_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, pos, inv_freq, axis, mask, cu_seqlens, causal, scale, batch, seqlen, max_seqlen):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, pos, inv_freq, axis, mask, cu_seqlens, causal, scale, batch, seqlen, max_seqlen = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, pos, inv_freq, axis, mask, cu_seqlens)
    ctx.args = (causal, scale, batch, seqlen, max_seqlen)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, pos, inv_freq, axis, mask, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _bwd_op(grad_out, q, k, v, out, lse, pos, inv_freq, axis, mask, cu_seqlens, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _triton_attention(
    q, k, v, position_ids, inv_freq, section, interleaved, *, causal, scale, attention_mask, cu_seqlens, max_seqlen
):
    """The "triton" backend: q [B,S,Hq,D] / [T,Hq,D] and k, v flattened to tokens, the custom op, out shaped
    like q (inputs already validated)."""
    if q.dtype == torch.float64:
        raise TypeError("q is float64, which the Triton kernels do not support; use backend='torch' or 'cpu'")
    if triton_interpret() and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        raise TypeError(
            "q is bfloat16, which the Triton interpreter cannot multiply correctly (tl.dot); use "
            "float16/float32 on CPU, or a CUDA device for bfloat16"
        )
    padded = q.dim() == 4
    if padded:
        batch, seqlen = q.shape[:2]
        mask = None if attention_mask is None else (attention_mask != 0).reshape(-1).to(torch.int8)
        grid_len = seqlen
    else:
        batch, seqlen = cu_seqlens.shape[0] - 1, 0
        mask = None
        grid_len = max_seqlen if max_seqlen is not None else 0
    flat = lambda t: t.contiguous().reshape(-1, t.shape[-2], t.shape[-1])  # noqa: E731
    pos = position_ids.reshape(3, -1).to(torch.int64).contiguous()
    axis = axis_tensor(section, interleaved, q.device)
    out, _ = _fwd_op(
        flat(q),
        flat(k),
        flat(v),
        pos,
        inv_freq.to(torch.float32).contiguous(),
        axis,
        mask,
        cu_seqlens,
        causal,
        scale,
        batch,
        seqlen,
        grid_len,
    )
    return out.view(q.shape)


# --------------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------------
def mcg_rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section,
    *,
    mrope_interleaved: bool = False,
    causal: bool = True,
    softmax_scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention with M-RoPE applied to q and k inside the kernel (angles from positions, no cos/sin tensors).

    Padded form: q [B,S,Hq,D], k/v [B,S,Hkv,D], position_ids [3,B,S] (t, h, w rows), optional
    attention_mask [B,S] (1 keep, 0 pad, any nonzero counts as keep; left or right padding, or any
    pattern) → out [B,S,Hq,D], 0 on padded query rows.
    Packed form: q [T,Hq,D], k/v [T,Hkv,D], position_ids [3,T], cu_seqlens int32 [B+1] (0 = first,
    T = last; non-decreasing), optional max_seqlen (longest sequence; read from cu_seqlens if omitted)
    → out [T,Hq,D]; no attention across sequences.
    inv_freq [D/2] (used in fp32), mrope_section (s_t, s_h, s_w) summing to D/2, in three contiguous
    blocks (Qwen2-VL, Qwen2.5-VL) or interleaved t h w t h w … (``mrope_interleaved=True``, Qwen3-VL);
    Hq % Hkv == 0 (GQA);
    D ∈ {64, 72, 80, 96, 128}; softmax_scale defaults to 1/sqrt(D).

    Equals ``apply_mrope`` followed by ``softmax(QKᵀ·scale + masks)·V``; differentiable in q, k, v.
    backend: "triton" (CUDA; CPU tensors under TRITON_INTERPRET=1), "cpu" (rotation + SDPA) or "torch"
    (the reference); default from CLINKD_BACKEND, else by device.
    """
    section, scale = check_inputs(
        q,
        k,
        v,
        position_ids,
        inv_freq,
        mrope_section,
        mrope_interleaved,
        causal,
        softmax_scale,
        attention_mask,
        cu_seqlens,
        max_seqlen,
    )
    chosen = resolve_backend("mcg_rope_attention", backend, q.device)
    if chosen == "triton":
        return _triton_attention(
            q,
            k,
            v,
            position_ids,
            inv_freq,
            section,
            mrope_interleaved,
            causal=causal,
            scale=scale,
            attention_mask=attention_mask,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
        )
    check_values(q, k, v, cu_seqlens, max_seqlen)
    if chosen == "cpu":
        from .cpu import mcg_rope_attention_cpu

        return mcg_rope_attention_cpu(
            q,
            k,
            v,
            position_ids,
            inv_freq,
            section,
            mrope_interleaved,
            causal=causal,
            scale=scale,
            attention_mask=attention_mask,
            cu_seqlens=cu_seqlens,
        )
    from .reference import mcg_rope_attention_reference

    return mcg_rope_attention_reference(
        q,
        k,
        v,
        position_ids,
        inv_freq,
        section,
        mrope_interleaved=mrope_interleaved,
        causal=causal,
        softmax_scale=scale,
        attention_mask=attention_mask,
        cu_seqlens=cu_seqlens,
    )
