"""Case builders and the comparison of out, dq, dk, dv shared by the attention tests."""

from __future__ import annotations

import torch

from tests.numerics import assert_close

from .inputs import SECTIONS, inv_freq, padding_mask, positions


def make_case(device, dtype, *, hq, hkv, d, b=None, s=None, pad=None, lengths=None, pos="text"):
    """Random q, k, v (+ position_ids, attention_mask / cu_seqlens) in the padded form (b, s, pad) or the
    packed form (lengths). Returns (tensors dict, kwargs for mcg_rope_attention)."""
    if lengths is None:
        mask = padding_mask(b, s, pad) if pad else torch.ones(b, s, dtype=torch.long)
        pos_ids = torch.ones(3, b, s, dtype=torch.long)  # padding positions: 1, as transformers
        for i, p in enumerate(positions(pos, mask.sum(1).tolist())):
            pos_ids[:, i, mask[i].bool()] = p
        lead = (b, s)
        extra = {"attention_mask": mask.to(device) if pad else None}
    else:
        pos_ids = torch.cat(positions(pos, lengths), dim=1)
        lead = (sum(lengths),)
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        extra = {"cu_seqlens": cu.to(device)}
    t = {
        "q": torch.randn(*lead, hq, d, dtype=dtype, device=device),
        "k": torch.randn(*lead, hkv, d, dtype=dtype, device=device),
        "v": torch.randn(*lead, hkv, d, dtype=dtype, device=device),
        "position_ids": pos_ids.to(device),
        "inv_freq": inv_freq(d).to(device),
        "mrope_section": SECTIONS[d],
    }
    return t, extra


def fwd_bwd(fn, t, extra, grad, *, causal, dtype=None):
    q, k, v = (t[n].detach().to(dtype or t[n].dtype).requires_grad_() for n in ("q", "k", "v"))
    out = fn(q, k, v, t["position_ids"], t["inv_freq"], t["mrope_section"], causal=causal, **extra)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    return out.detach(), dq, dk, dv


def assert_all_close(got, ref, base, *, group_rounding: bool = False):
    """out, dq, dk, dv under the §4 rule, with atol scaled by the tensor's magnitude: gradients summed over
    many rows (dv, dk over a GQA group) reach values of several units, where one rounding of the
    output dtype is already above the unit-scale default atol.

    dq, dk get 4× that in fp32 and 2× in fp16/bf16. They pass through dS = P∘(dP − δ) with
    δ = rowsum(dO·O) (the FlashAttention backward): where a row has one key (p = 1) this cancels exactly
    in the reference's softmax backward but leaves a few fp32 ulps of |dP| in any implementation that
    forms δ from O (SDPA's included; e.g. 4e-6 on an exactly-zero fp32 reference gradient); and dS is
    rounded to the input dtype before its matmuls, so one element in ~10^4 lands a fraction of an ulp
    beyond twice the baseline's error.

    ``group_rounding``: dK, dV also get ×(Hq/Hkv) in fp16/bf16, for implementations that round each query
    head's dK/dV to the input dtype before summing over the GQA group (SDPA's CPU backward with
    ``enable_gqa``): a sum of g rounded terms is off by up to g/2 ulps where the baseline, summing in
    fp32, is off by half of one."""
    group = got[1].shape[-2] // got[2].shape[-2]
    for name, g, r, bl in zip(("out", "dq", "dk", "dv"), got, ref, base):
        unit = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[g.dtype]
        if name in ("dq", "dk"):
            unit *= 4 if g.dtype == torch.float32 else 2
        if group_rounding and name in ("dk", "dv") and g.dtype != torch.float32:
            unit *= group
        assert_close(name, g, r, bl, atol=unit * max(1.0, float(r.abs().max())))
