"""``apply_mrope``: rotate q and k by M-RoPE angles: the public function, its checks, the custom op and autograd.

    q [B,S,Hq,D], k [B,S,Hkv,D], position_ids [3,B,S]   (or packed: q [T,Hq,D], k [T,Hkv,D], [3,T])
    inv_freq [D/2] fp32, mrope_section (s_t, s_h, s_w), s_t + s_h + s_w = D/2
    → q_rot, k_rot: new contiguous tensors, same shapes and dtypes

    θ_j = position_ids[axis(j)] · inv_freq[j] in fp32;  axis(j) = t | h | w by section
    (x_j, x_{j+D/2}) → scale · (x_j cos θ_j − x_{j+D/2} sin θ_j,  x_{j+D/2} cos θ_j + x_j sin θ_j)

The map is linear in q and k with the orthogonal matrix R(θ) (times scale), so the backward is the
same op with −θ: grad_q = scale · R(−θ) grad_q_rot. One custom op, ``clinkd::mrope_rotate``,
carries an ``inverse`` flag and is its own derivative (so double backward works too).

Backends: "triton" (``kernels.py`` via ``launch.py``; CUDA, or CPU under TRITON_INTERPRET=1 when
named), "cpu" (``cpu.py``: token-chunked torch, no [3,B,S,D] cos/sin tensors), "torch" (the
reference in ``reference.py``). q and k may be strided views
(e.g. slices of a fused qkv projection): any strides over batch, sequence and heads, but the last
dim must be contiguous, otherwise it is copied to contiguous first.
"""

from __future__ import annotations

import torch

from .._dispatch import empty_output, resolve_backend
from .._validation import FLOAT_DTYPES, check_positive_float, check_same_device, check_tensor
from .cpu import mrope_rotate_cpu
from .reference import apply_mrope_reference

_BACKENDS = ("triton", "cpu", "torch")


# ---------------------------------------------------------------------------------------------------
# Implementations. All take 4-D q/k ([B,S,H,D]) and [3,B,S] positions and return new contiguous tensors.


def _rotate_triton(q, k, position_ids, inv_freq, section, scale, inverse):
    from .launch import mrope_rotate_triton

    q_out = empty_output(q.shape, dtype=q.dtype, device=q.device)
    k_out = empty_output(k.shape, dtype=k.dtype, device=k.device)
    if q.numel() or k.numel():
        mrope_rotate_triton(q, k, q_out, k_out, position_ids, inv_freq.contiguous(), section, scale, inverse)
    return q_out, k_out


def _rotate_torch(q, k, position_ids, inv_freq, section, scale, inverse):
    """The reference (the inverse rotates by −θ, computed in fp32 like the forward)."""
    q_rot, k_rot = apply_mrope_reference(q, k, position_ids, inv_freq, section, attention_scaling=scale,
                                         inverse=inverse)
    return q_rot.contiguous(), k_rot.contiguous()


_IMPLS = {"triton": _rotate_triton, "cpu": mrope_rotate_cpu, "torch": _rotate_torch}


# ---------------------------------------------------------------------------------------------------
# Custom op (forward and backward are the same op with the inverse flag flipped).


@torch.library.custom_op("clinkd::mrope_rotate", mutates_args=())
def mrope_rotate(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                 mrope_section: list[int], attention_scaling: float, inverse: bool,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scale·R(±θ) applied to q [B,S,Hq,D] and k [B,S,Hkv,D]; inputs already validated."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    return _IMPLS[backend](q, k, position_ids, inv_freq, mrope_section, attention_scaling, inverse)


@mrope_rotate.register_fake
def _(q, k, position_ids, inv_freq, mrope_section, attention_scaling, inverse, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, _, position_ids, inv_freq, section, scale, inverse, backend = inputs
    ctx.save_for_backward(position_ids, inv_freq)
    ctx.args = (section, scale, inverse, backend)


def _backward(ctx, grad_q, grad_k):
    position_ids, inv_freq = ctx.saved_tensors
    section, scale, inverse, backend = ctx.args
    grad_q, grad_k = mrope_rotate(grad_q, grad_k, position_ids, inv_freq, section, scale, not inverse, backend)
    return grad_q, grad_k, None, None, None, None, None, None


mrope_rotate.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public entry point.


def _check_inputs(q, k, position_ids, inv_freq, mrope_section, attention_scaling):
    check_tensor("q", q, ndim=(3, 4), dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=(3, 4), dtypes=FLOAT_DTYPES)
    if k.dim() != q.dim():
        raise ValueError(f"q and k must both be 4-D [B,S,H,D] or both 3-D [T,H,D]; got q {list(q.shape)}, "
                         f"k {list(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"q and k must have one dtype, got q {q.dtype} and k {k.dtype}")
    tokens = q.shape[:-2]
    if k.shape[:-2] != tokens:
        what = "batch and sequence" if q.dim() == 4 else "token"
        raise ValueError(f"q and k must agree on the {what} dims: q {list(q.shape)}, k {list(k.shape)}")
    D = q.shape[-1]
    if k.shape[-1] != D:
        raise ValueError(f"q and k must have the same head dim: q has {D}, k has {k.shape[-1]}")
    if D % 2 or not 2 <= D <= 256:
        raise ValueError(f"head dim must be even and in [2, 256], got {D}")
    check_tensor("position_ids", position_ids, dtypes=(torch.int64, torch.int32))
    want = [3, *tokens]
    if list(position_ids.shape) != want:
        raise ValueError(f"position_ids must have shape {want} (3 rows t, h, w over the tokens of q), "
                         f"got {list(position_ids.shape)}")
    check_tensor("inv_freq", inv_freq, ndim=1, dtypes=(torch.float32,))
    if inv_freq.shape[0] != D // 2:
        raise ValueError(f"inv_freq must have shape [{D // 2}] (D/2), got {list(inv_freq.shape)}")
    if isinstance(mrope_section, torch.Tensor):
        mrope_section = mrope_section.tolist()
    try:
        section = [int(s) for s in mrope_section]
    except TypeError:
        raise TypeError(f"mrope_section must be a sequence of 3 ints, got {mrope_section!r}") from None
    if len(section) != 3 or any(s < 0 for s in section) or any(int(s) != s for s in mrope_section):
        raise ValueError(f"mrope_section must be 3 non-negative ints, got {list(mrope_section)}")
    if sum(section) != D // 2:
        raise ValueError(f"mrope_section must sum to D/2 = {D // 2}, got {section} (sum {sum(section)})")
    check_same_device(q=q, k=k, position_ids=position_ids, inv_freq=inv_freq)
    return section, check_positive_float("attention_scaling", attention_scaling)


def apply_mrope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                mrope_section, *, attention_scaling: float = 1.0,
                backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by multimodal rotary angles (Qwen2-VL M-RoPE, rotate-half convention).

    Args:
        q: [B, S, Hq, D] (or packed [T, Hq, D]); fp32/fp16/bf16. Strides over B, S, H are free.
        k: [B, S, Hkv, D] (or [T, Hkv, D]); same dtype; Hkv may differ from Hq (GQA).
        position_ids: [3, B, S] (or [3, T]) int64/int32, rows t, h, w (see ``mcg_rope_index``).
        inv_freq: [D/2] fp32 rotary frequencies.
        mrope_section: (s_t, s_h, s_w), summing to D/2 (Qwen2-VL-7B: (16, 24, 24) for D = 128).
        attention_scaling: multiplies cos and sin (1.0 for Qwen2-VL).
        backend: "triton" | "cpu" | "torch" (default: triton on CUDA, cpu on CPU; or CLINKD_BACKEND).

    Returns:
        (q_rot, k_rot), new contiguous tensors shaped like q and k. Differentiable in q and k
        (position_ids and inv_freq get no gradient).
    """
    section, scale = _check_inputs(q, k, position_ids, inv_freq, mrope_section, attention_scaling)
    backend = resolve_backend("apply_mrope", backend, q.device, _BACKENDS)
    packed = q.dim() == 3
    if packed:
        q, k, position_ids = q.unsqueeze(0), k.unsqueeze(0), position_ids.unsqueeze(1)
    q_rot, k_rot = mrope_rotate(q, k, position_ids, inv_freq, section, scale, False, backend)
    if packed:
        q_rot, k_rot = q_rot.squeeze(0), k_rot.squeeze(0)
    return q_rot, k_rot
