"""Plain PyTorch reference for the M-RoPE rotation, written the way transformers' Qwen2-VL does it.

Math (DESIGN.md §3.2), for head dim D, half = D/2, sections (s_t, s_h, s_w) with s_t+s_h+s_w = half:

    axis(j) = t if j < s_t, h if j < s_t + s_h, else w            (j < half; j + half uses axis(j))
    θ_j     = position_ids[axis(j)] · inv_freq[j]                 (fp32)
    (x_j, x_{j+half}) → (x_j cos θ_j − x_{j+half} sin θ_j,  x_{j+half} cos θ_j + x_j sin θ_j)

i.e. ``x·cos + rotate_half(x)·sin`` with cos/sin of length D (the half repeated twice). The
backward is the rotation by −θ. ``attention_scaling`` multiplies cos and sin (transformers' dynamic
rope types use it; 1.0 for Qwen2-VL's default).
"""

from __future__ import annotations

import torch


def section_axis(mrope_section) -> torch.Tensor:
    """int64 [D/2]: which position row (0 = t, 1 = h, 2 = w) drives each rotary frequency."""
    return torch.cat([torch.full((int(s),), a, dtype=torch.long) for a, s in enumerate(mrope_section)])


def mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section, *,
                  attention_scaling: float = 1.0, dtype: torch.dtype = torch.float32):
    """cos, sin of shape [*position_ids.shape[1:], D] for position_ids [3, ...] and inv_freq [D/2]."""
    s_t, s_h, s_w = (int(s) for s in mrope_section)
    half = inv_freq.shape[0]
    assert s_t + s_h + s_w == half, "mrope_section must sum to D/2"
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    freqs = position_ids.to(compute).unsqueeze(-1) * inv_freq.to(compute)  # [3, ..., half]
    axis = section_axis(mrope_section).to(freqs.device)
    theta = torch.gather(freqs, 0, axis.expand(freqs.shape[1:]).unsqueeze(0)).squeeze(0)  # [..., half]
    emb = torch.cat([theta, theta], dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_mrope_reference(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                          mrope_section, *, attention_scaling: float = 1.0, inverse: bool = False):
    """Rotate q [B,S,Hq,D] and k [B,S,Hkv,D] by position_ids [3,B,S] (or q [T,H,D] with [3,T]);
    ``inverse``: by −θ (x·cos − rotate_half(x)·sin, the backward of the rotation).

    Computed in the dtype of q, except float16/bfloat16, which are computed in float32 and cast back
    (as transformers does). Pass float64 tensors for a float64 reference.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    cos, sin = mrope_cos_sin(position_ids, inv_freq, mrope_section, attention_scaling=attention_scaling,
                             dtype=compute)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    if inverse:
        sin = -sin
    qc, kc = q.to(compute), k.to(compute)
    q_rot = qc * cos + rotate_half(qc) * sin
    k_rot = kc * cos + rotate_half(kc) * sin
    return q_rot.to(q.dtype), k_rot.to(k.dtype)


def mcg_rope_index_reference(input_ids: torch.Tensor, *, image_grid_thw=None, video_grid_thw=None,
                             attention_mask=None, image_token_id: int, video_token_id: int,
                             vision_start_token_id: int | None = None, spatial_merge_size: int = 2,
                             modality_gap: int = 2, vision_stride: int = 1, pad_position: int = 1):
    """MCG-RoPE position ids, one row and one token at a time (the spec for ``mcg_rope_index``).

    input_ids [B,S] → (position_ids [3,B,S], rope_deltas [B,1]), both int64 on CPU.

    Rules (DESIGN.md §3.1): the unpadded tokens of a row form segments: text runs and vision runs
    (consecutive placeholder tokens of one image or video, t·(h/m)·(w/m) of them). The first segment
    starts at 0, every later one at (largest position so far) + modality_gap. A text run counts up by
    one on all three rows; vision token (ti, hi, wi) of a run with base b gets
    (b + ti, b + hi·vision_stride, b + wi·vision_stride). Grids are consumed in batch order.
    rope_deltas[b] = largest position + 1 − number of unpadded tokens. Padding gets ``pad_position``.
    """
    m, gap, stride = spatial_merge_size, modality_gap, vision_stride
    B, S = input_ids.shape
    position_ids = torch.full((3, B, S), pad_position, dtype=torch.long)
    rope_deltas = torch.zeros(B, 1, dtype=torch.long)
    grids = {image_token_id: iter([] if image_grid_thw is None else image_grid_thw.tolist()),
             video_token_id: iter([] if video_grid_thw is None else video_grid_thw.tolist())}
    for b in range(B):
        keep = torch.ones(S, dtype=torch.bool) if attention_mask is None else attention_mask[b].bool().cpu()
        ids = input_ids[b].cpu()[keep].tolist()
        runs: list[list] = []  # [kind, first index, length]; kind None = text
        for i, tok in enumerate(ids):
            kind = tok if tok in (image_token_id, video_token_id) else None
            if runs and runs[-1][0] == kind:
                runs[-1][2] += 1
            else:
                runs.append([kind, i, 1])
        cols: list[tuple[int, int, int]] = []
        largest = None
        for kind, first, n in runs:
            base = 0 if largest is None else largest + gap
            if kind is None:
                new = [(base + i,) * 3 for i in range(n)]
            else:
                if vision_start_token_id is not None and (first == 0 or ids[first - 1] != vision_start_token_id):
                    raise ValueError(f"row {b}: vision run at token {first} is not preceded by vision_start_token_id")
                grid = next(grids[kind], None)
                if grid is None:
                    raise ValueError(f"row {b}: more vision runs than grid rows")
                t, h, w = grid
                if h % m or w % m:
                    raise ValueError(f"grid {grid} is not divisible by spatial_merge_size={m}")
                if n != t * (h // m) * (w // m):
                    raise ValueError(f"row {b}: vision run of {n} tokens but grid {grid} needs {t * (h // m) * (w // m)}")
                new = [(base + ti, base + hi * stride, base + wi * stride)
                       for ti in range(t) for hi in range(h // m) for wi in range(w // m)]
            largest = max(max(c) for c in new)
            cols += new
        if cols:
            where = keep.nonzero().flatten()
            position_ids[:, b, where] = torch.tensor(cols, dtype=torch.long).T
            rope_deltas[b, 0] = largest + 1 - len(ids)
    for kind, it in grids.items():
        if next(it, None) is not None:
            raise ValueError("more grid rows than vision runs")
    return position_ids, rope_deltas


def apply_mrope_reference_exact(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor,
                                inv_freq: torch.Tensor, mrope_section, *, attention_scaling: float = 1.0):
    """The float64 reference for tests: θ as the spec defines it (the fp32 product position·inv_freq),
    cos/sin and the rotation in float64. Returns float64 tensors shaped like q and k.

    (Computing θ itself in float64 would differ from every fp32 implementation by θ·2^-24, i.e. by
    ~6e-4 rad at positions ~1e4 — a difference in the spec's angles, not an error of the kernel.)
    """
    axis = section_axis(mrope_section)
    pos = position_ids.to(torch.float32)                                    # [3, ...]
    theta = (pos[axis.to(pos.device)] * inv_freq.float().view(-1, *([1] * (pos.dim() - 1))))  # [half, ...] fp32
    theta = theta.movedim(0, -1).double()                                   # [..., half]
    emb = torch.cat([theta, theta], dim=-1).unsqueeze(-2)                   # broadcast over heads
    cos, sin = emb.cos() * attention_scaling, emb.sin() * attention_scaling
    out = []
    for x in (q, k):
        xd = x.double()
        out.append(xd * cos + rotate_half(xd) * sin)
    return tuple(out)
