"""Plain PyTorch reference of the MCG-RoPE position indices: one row and one token at a time.

Written for clarity, not speed: the spec ``mcg_rope_index``'s two vectorised paths (``cpu.py``,
``device.py``) are tested against, on random batches. The rules are transformers 5.x's
``get_rope_index`` of Qwen2-VL, Qwen2.5-VL and Qwen3-VL, with ClinKD's modality gap λ and vision
stride α (λ = α = 1 is stock):

* text run at base b: token r → (b + r, b + r, b + r); the next segment starts at b + (n − 1) + λ.
* vision run at base b, grid (t, h, w), H = h/m, W = w/m: token r = (ti·H + hi)·W + wi →
  (b + T(ti), b + hi·α, b + wi·α); the next segment starts at b + (max(H, W) − 1)·α + λ, its
  largest *spatial* position + λ, whatever t is.
* T(ti) = ti for images and for videos without a time interval; with one (Qwen2.5-VL),
  T(ti) = int(float32(ti) · float32(interval)).
* split_video_frames (Qwen3-VL): a video grid row (t, h, w) is t grid rows (1, h, w), one per run.
* rope_deltas = largest position of the row (any of t, h, w) + 1 − number of unpadded tokens.
"""

from __future__ import annotations

import numpy as np
import torch


def _video_grids(video_grid_thw, video_time_interval, split_video_frames: bool):
    """[(grid row, interval or None)] in the order video runs consume them."""
    rows = [] if video_grid_thw is None else [tuple(g) for g in video_grid_thw.tolist()]
    if split_video_frames:
        if video_time_interval is not None:
            raise ValueError("video_time_interval with split_video_frames=True: no Qwen-VL family does both")
        return [((1, h, w), None) for t, h, w in rows for _ in range(t)]
    if video_time_interval is None:
        intervals = [None] * len(rows)
    elif isinstance(video_time_interval, torch.Tensor):
        intervals = video_time_interval.float().tolist()  # float32 values
    else:
        intervals = [video_time_interval] * len(rows)
    if len(intervals) != len(rows):
        raise ValueError(f"video_time_interval has {len(intervals)} values for {len(rows)} video grid rows")
    return list(zip(rows, intervals))


def mcg_rope_index_reference(
    input_ids: torch.Tensor,
    *,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int | None = None,
    spatial_merge_size: int = 2,
    modality_gap: int = 2,
    vision_stride: int = 1,
    pad_position: int = 1,
    video_time_interval=None,
    split_video_frames: bool = False,
):
    """MCG-RoPE position ids, one row and one token at a time (the spec for ``mcg_rope_index``).

    input_ids [B,S] → (position_ids [3,B,S], rope_deltas [B,1]), both int64 on CPU.
    video_time_interval: None, a float, or a float tensor [N_vid] (one per video grid row).

    Rules (see the module docstring): the unpadded tokens of a row form segments, text runs and
    vision runs (consecutive placeholder tokens of one image or video (frame), t·(h/m)·(w/m) of them).
    The first segment starts at 0; after a text run the next starts at its last position +
    modality_gap, after a vision run at its base + (max(h, w)/m − 1)·vision_stride + modality_gap.
    Grids (and intervals) are consumed in batch order. Padding gets ``pad_position``.
    """
    m, gap, stride = spatial_merge_size, modality_gap, vision_stride
    B, S = input_ids.shape
    position_ids = torch.full((3, B, S), pad_position, dtype=torch.long)
    rope_deltas = torch.zeros(B, 1, dtype=torch.long)
    images = [(tuple(g), None) for g in ([] if image_grid_thw is None else image_grid_thw.tolist())]
    grids = {
        image_token_id: iter(images),
        video_token_id: iter(_video_grids(video_grid_thw, video_time_interval, split_video_frames)),
    }
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
        base = 0
        for kind, first, n in runs:
            if kind is None:
                cols += [(base + i,) * 3 for i in range(n)]
                base += (n - 1) + gap
                continue
            if vision_start_token_id is not None and (first == 0 or ids[first - 1] != vision_start_token_id):
                raise ValueError(f"row {b}: vision run at token {first} is not preceded by vision_start_token_id")
            grid, interval = next(grids[kind], (None, None))
            if grid is None:
                raise ValueError(f"row {b}: more vision runs than grid rows")
            t, h, w = grid
            if h % m or w % m:
                raise ValueError(f"grid {grid} is not divisible by spatial_merge_size={m}")
            H, W = h // m, w // m
            if n != t * H * W:
                raise ValueError(f"row {b}: vision run of {n} tokens but grid {grid} needs {t * H * W}")
            if interval is None:
                times = list(range(t))
            else:
                # stock: (torch.arange(t) * time_interval).long(), a float32 product truncated
                times = [int(np.float32(ti) * np.float32(interval)) for ti in range(t)]
            cols += [
                (base + times[ti], base + hi * stride, base + wi * stride)
                for ti in range(t)
                for hi in range(H)
                for wi in range(W)
            ]
            base += (max(H, W) - 1) * stride + gap
        if cols:
            where = keep.nonzero().flatten()
            position_ids[:, b, where] = torch.tensor(cols, dtype=torch.long).T
            rope_deltas[b, 0] = max(max(c) for c in cols) + 1 - len(ids)
    for it in grids.values():
        if next(it, None) is not None:
            raise ValueError("more grid rows than vision runs")
    return position_ids, rope_deltas
