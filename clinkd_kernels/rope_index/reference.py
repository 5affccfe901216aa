"""Plain PyTorch reference of the MCG-RoPE position indices: one row and one token at a time.

Written for clarity, not speed: the spec ``mcg_rope_index``'s two vectorised paths (``cpu.py``,
``kernels.py``) are tested against, on random batches.
"""

from __future__ import annotations

import torch


def mcg_rope_index_reference(input_ids: torch.Tensor, *, image_grid_thw=None, video_grid_thw=None,
                             attention_mask=None, image_token_id: int, video_token_id: int,
                             vision_start_token_id: int | None = None, spatial_merge_size: int = 2,
                             modality_gap: int = 2, vision_stride: int = 1, pad_position: int = 1):
    """MCG-RoPE position ids, one row and one token at a time (the spec for ``mcg_rope_index``).

    input_ids [B,S] → (position_ids [3,B,S], rope_deltas [B,1]), both int64 on CPU.

    Rules: the unpadded tokens of a row form segments: text runs and vision runs
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
