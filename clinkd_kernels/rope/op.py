"""``apply_mrope``: rotate q and k by M-RoPE angles: the public function, the custom op and its autograd.

    q [B,S,Hq,D], k [B,S,Hkv,D], position_ids [3,B,S]   (or packed: q [T,Hq,D], k [T,Hkv,D], [3,T])
    inv_freq [D/2] fp32, mrope_section (s_t, s_h, s_w), s_t + s_h + s_w = D/2
    → q_rot, k_rot: new contiguous tensors, same shapes and dtypes

    θ_j = position_ids[axis(j)] · inv_freq[j] in fp32;  axis(j) = t | h | w by section, in three
          contiguous blocks (Qwen2-VL, Qwen2.5-VL) or interleaved t h w t h w … (Qwen3-VL)
    (x_j, x_{j+D/2}) → scale · (x_j cos θ_j − x_{j+D/2} sin θ_j,  x_{j+D/2} cos θ_j + x_j sin θ_j)

The frequency-to-axis assignment is data: ``rope_axis`` turns (sections, layout) into an int32 [D/2]
vector (made once per sections, layout and device), which the kernels read; no kernel is
specialised on the sections or the layout.

The map is linear in q and k with the orthogonal matrix R(θ) (times scale), so the backward is the
same op with −θ: grad_q = scale · R(−θ) grad_q_rot. One custom op, ``clinkd::mrope_rotate``,
carries an ``inverse`` flag and is its own derivative (so double backward works too).

Backends (``_dispatch.OP_BACKENDS``): "triton" (``kernels.py`` via ``launch.py``; CUDA, or CPU under
TRITON_INTERPRET=1 when named), "cpu" (``cpu.py``: the C++ kernel, or token-chunked torch; no
[3,B,S,D] cos/sin tensors), "torch" (the reference in ``reference.py``). The argument checks are
``checks.py``'s. q and k may be strided views
(e.g. slices of a fused qkv projection): any strides over batch, sequence and heads, but the last
dim must be contiguous, otherwise it is copied to contiguous first.
"""

from __future__ import annotations

import torch

from .._dispatch import resolve_backend
from .._memory import empty_output
from .checks import check_inputs
from .cpu import mrope_rotate_cpu
from .layout import axis_tensor
from .reference import apply_mrope_reference

# ---------------------------------------------------------------------------------------------------
# Implementations. All take 4-D q/k ([B,S,H,D]), [3,B,S] positions, the sections and the layout flag,
# and return new contiguous tensors.


def _rotate_triton(q, k, position_ids, inv_freq, section, interleaved, scale, inverse):
    """q [B,S,Hq,D], k [B,S,Hkv,D] rotated by the Triton kernel into new contiguous tensors."""
    from .launch import mrope_rotate_triton

    q_out = empty_output(q.shape, dtype=q.dtype, device=q.device)
    k_out = empty_output(k.shape, dtype=k.dtype, device=k.device)
    if q.numel() or k.numel():
        mrope_rotate_triton(
            q,
            k,
            q_out,
            k_out,
            position_ids,
            inv_freq.contiguous(),
            axis_tensor(section, interleaved, q.device),
            scale,
            inverse,
        )
    return q_out, k_out


def _rotate_torch(q, k, position_ids, inv_freq, section, interleaved, scale, inverse):
    """The reference (the inverse rotates by −θ, computed in fp32 like the forward)."""
    q_rot, k_rot = apply_mrope_reference(
        q, k, position_ids, inv_freq, section, attention_scaling=scale, inverse=inverse, mrope_interleaved=interleaved
    )
    return q_rot.contiguous(), k_rot.contiguous()


_IMPLS = {"triton": _rotate_triton, "cpu": mrope_rotate_cpu, "torch": _rotate_torch}


# ---------------------------------------------------------------------------------------------------
# Custom op (forward and backward are the same op with the inverse flag flipped).


@torch.library.custom_op("clinkd::mrope_rotate", mutates_args=())
def mrope_rotate(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: list[int],
    mrope_interleaved: bool,
    attention_scaling: float,
    inverse: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scale·R(±θ) applied to q [B,S,Hq,D] and k [B,S,Hkv,D]; inputs already validated."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    return _IMPLS[backend](q, k, position_ids, inv_freq, mrope_section, mrope_interleaved, attention_scaling, inverse)


@mrope_rotate.register_fake
def _(q, k, position_ids, inv_freq, mrope_section, mrope_interleaved, attention_scaling, inverse, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    )


def _setup_context(ctx, inputs, output):
    _, _, position_ids, inv_freq, section, interleaved, scale, inverse, backend = inputs
    ctx.save_for_backward(position_ids, inv_freq)
    ctx.args = (section, interleaved, scale, inverse, backend)


def _backward(ctx, grad_q, grad_k):
    position_ids, inv_freq = ctx.saved_tensors
    section, interleaved, scale, inverse, backend = ctx.args
    grad_q, grad_k = mrope_rotate(
        grad_q, grad_k, position_ids, inv_freq, section, interleaved, scale, not inverse, backend
    )
    return grad_q, grad_k, None, None, None, None, None, None, None


mrope_rotate.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public entry point.


def apply_mrope(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section,
    *,
    attention_scaling: float = 1.0,
    mrope_interleaved: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by multimodal rotary angles (Qwen2-VL M-RoPE, rotate-half convention).

    Args:
        q: [B, S, Hq, D] (or packed [T, Hq, D]); fp32/fp16/bf16. Strides over B, S, H are free.
        k: [B, S, Hkv, D] (or [T, Hkv, D]); same dtype; Hkv may differ from Hq (GQA).
        position_ids: [3, B, S] (or [3, T]) int64/int32, rows t, h, w (see ``mcg_rope_index``).
        inv_freq: [D/2] fp32 rotary frequencies.
        mrope_section: (s_t, s_h, s_w), summing to D/2 (Qwen2-VL-7B: (16, 24, 24) for D = 128).
        attention_scaling: multiplies cos and sin (1.0 for Qwen2-VL).
        mrope_interleaved: False: sections in three contiguous blocks t…t h…h w…w (Qwen2-VL,
            Qwen2.5-VL); True: interleaved t h w t h w … t…t (Qwen3-VL, e.g. (24, 20, 20) for D = 128).
        backend: "triton" | "cpu" | "torch" (default: triton on CUDA, cpu on CPU; or CLINKD_BACKEND).

    Returns:
        (q_rot, k_rot), new contiguous tensors shaped like q and k. Differentiable in q and k
        (position_ids and inv_freq get no gradient).
    """
    section, scale = check_inputs(q, k, position_ids, inv_freq, mrope_section, attention_scaling, mrope_interleaved)
    backend = resolve_backend("apply_mrope", backend, q.device)
    packed = q.dim() == 3
    if packed:
        q, k, position_ids = q.unsqueeze(0), k.unsqueeze(0), position_ids.unsqueeze(1)
    q_rot, k_rot = mrope_rotate(q, k, position_ids, inv_freq, list(section), mrope_interleaved, scale, False, backend)
    if packed:
        q_rot, k_rot = q_rot.squeeze(0), k_rot.squeeze(0)
    return q_rot, k_rot
