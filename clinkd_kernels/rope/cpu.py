"""CPU path of ``apply_mrope`` (backend ``"cpu"``): the C++ kernel ``clinkd::mrope_rotate_ext``
(csrc/rope/mrope_rotate_cpu.cpp), or token-chunked PyTorch where the extension is not built; no
[3,B,S,D] cos/sin tables either way.

Same contract as the Triton launcher (``launch.py``): q [B,S,Hq,D], k [B,S,Hkv,D] (last dim
contiguous), position_ids [3,B,S], inv_freq fp32 [D/2] → new contiguous q', k'. Angles in fp32 as
in the kernel; cos and sin from libm, the rotation in fp32 (fp16/bf16 cast back).

The C++ kernel is one parallel region per call. The PyTorch version runs about thirty multi-threaded
elementwise ops per call, each a fork/join: on a machine shared with other work every join waits for
a core the scheduler gave away, so it slows down many times over where the C++ kernel waits once.
"""

from __future__ import annotations

import torch

from .._dispatch import extension
from .._memory import empty_output
from .layout import axis_tensor

_CPU_CHUNK_ELEMS = 1 << 20  # elements of q+k per step: bounds temporaries, few ops


def mrope_rotate_cpu(q, k, position_ids, inv_freq, section, interleaved, scale, inverse):
    """The C++ kernel; without the extension, token-chunked torch: per chunk of tokens, fp32 angles
    [n, D/2], then each half written in place.

    fp32 halves are written straight into the output (mul, then addcmul in place): no temporaries
    but the chunk's angles; fp16/bf16 chunks go through one fp32 copy each. Chunks of ~1M elements
    keep that bounded while keeping the number of (multi-threaded) ops small. No [3,B,S,D] cos/sin.
    """
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    half = D // 2
    q_out = empty_output(q.shape, dtype=q.dtype, device=q.device)
    k_out = empty_output(k.shape, dtype=k.dtype, device=k.device)
    if extension() is not None:
        torch.ops.clinkd.mrope_rotate_ext(
            q,
            k,
            q_out,
            k_out,
            position_ids,
            inv_freq.contiguous(),
            axis_tensor(section, interleaved, q.device),
            float(scale),
            bool(inverse),
        )
        return q_out, k_out
    axis = axis_tensor(section, interleaved, q.device).long()
    pos = position_ids.reshape(3, B * S)
    qf, kf = q.reshape(B * S, Hq, D), k.reshape(B * S, Hkv, D)  # views when the strides allow
    qo, ko = q_out.view(B * S, Hq, D), k_out.view(B * S, Hkv, D)
    step = max(1, _CPU_CHUNK_ELEMS // max(1, (Hq + Hkv) * D))
    for t0 in range(0, B * S, step):
        sl = slice(t0, t0 + step)
        p = pos[:, sl]
        theta = p.T.gather(1, axis.expand(p.shape[1], half)).float() * inv_freq  # [n, half] fp32
        cos = (theta.cos() * scale).unsqueeze(1)
        sin = (theta.sin() * (-scale if inverse else scale)).unsqueeze(1)
        for x, out in ((qf[sl], qo[sl]), (kf[sl], ko[sl])):
            x = x.float()  # no copy for fp32
            o = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32)
            x1, x2, o1, o2 = x[..., :half], x[..., half:], o[..., :half], o[..., half:]
            torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
            torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
            if o is not out:
                out.copy_(o)
    return q_out, k_out
