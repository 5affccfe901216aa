"""MCG-RoPE position indices on the host, vectorised with NumPy (the CPU path of ``mcg_rope_index``).

    ids [B,S] → positions [3,B,S], deltas [B,1]      (NumPy int64; see op.py for the rules)

The batch is one stream of tokens (padding removed, rows back to back). Segments are found once
(where the token type changes, or a row begins); everything about them (type, grid, extent, base)
is then a small array over segments, and tokens are filled from it:

    text token at stream index i of segment s:  i + (base_s − start_s)        (all three rows)
    vision token r of segment s:                base_s + (T(ti), hi·α, wi·α),   r = (ti·H + hi)·W + wi

T(ti) = ti, or int(float32(ti)·float32(interval)) for a video with a time interval. base_s is an
exclusive prefix sum of (extent + gap) over the segments of the row, the extent of a vision run
being spatial only, (max(H, W) − 1)·α. A row's largest position is a max over its segments (one
``maximum.reduceat``): every segment has its largest t, h and w at its last token. With
split_video_frames the video grid is expanded to one (1, h, w) row per frame first. No Python loop
runs over tokens, segments or rows. At training shapes this is per-op-cost bound; NumPy's small-array
overhead is several times lower than PyTorch's, which is why the CPU path lives here.
"""

from __future__ import annotations

import numpy as np


def _fail(msg: str):
    raise ValueError(msg)


def check_grid(name: str, grid: np.ndarray | None, m: int) -> None:
    """t ≥ 1 and h, w positive multiples of the merge size, else ValueError naming the grid row."""
    if grid is None or grid.shape[0] == 0:
        return
    if grid.min() >= 1 and not (grid[:, 1:] % m).any():   # h, w ≥ 1 and multiples of m → ≥ m
        return
    bad = (grid < 1).any(1) | (grid[:, 1:] % m != 0).any(1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        _fail(f"{name}[{i}] = {tuple(grid[i].tolist())}: t must be >= 1 and h, w positive multiples of "
              f"spatial_merge_size={m}")


def _tokens(grid_row, m: int) -> int:
    """t·(h/m)·(w/m) of one grid row (t, h, w), exactly (Python ints): for error messages."""
    t, h, w = (int(v) for v in grid_row)
    return t * (h // m) * (w // m)


def _frozen_arange(n: int) -> np.ndarray:
    a = np.arange(n)
    a.setflags(write=False)
    return a


_ARANGE = _frozen_arange(1 << 16)


def _arange(n: int) -> np.ndarray:
    """Read-only view of 0..n-1 from a cached array (np.arange costs as much as a real op here)."""
    global _ARANGE
    if n > _ARANGE.size:
        _ARANGE = _frozen_arange(1 << (n - 1).bit_length())
    return _ARANGE[:n]


def mcg_rope_index_cpu(ids: np.ndarray, image_grid: np.ndarray | None, video_grid: np.ndarray | None,
                        mask: np.ndarray | None, image_token_id: int, video_token_id: int,
                        vision_start_token_id: int | None, m: int, gap: int, stride: int,
                        pad_position: int, video_interval: np.ndarray | None = None,
                        split: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Positions [3,B,S] and deltas [B,1] (int64) for ids [B,S]; grids [n,3] int64; mask [B,S] bool.

    video_interval: float32 [n_vid] time interval per video grid row, or None (interval 1);
    split: each video grid row (t, h, w) is t rows (1, h, w), one per video run (Qwen3-VL).
    """
    B, S = ids.shape
    n_img_grid = 0 if image_grid is None else image_grid.shape[0]
    n_vid_grid = 0 if video_grid is None else video_grid.shape[0]
    if video_interval is not None:
        check_interval(video_interval)
        if video_interval.size != n_vid_grid:
            _fail(f"video_time_interval has {video_interval.size} values but video_grid_thw has {n_vid_grid} rows")
        if n_vid_grid == 0:
            video_interval = None

    # The token stream: kept tokens, row after row.
    if mask is None:
        tok = ids.reshape(-1)
        lengths = np.full(B, S, dtype=np.int64)
        row_start = _arange(B) * S
    else:
        tok = ids.reshape(-1)[mask.reshape(-1)]
        lengths = mask.sum(1, dtype=np.int64)
        row_start = np.cumsum(lengths) - lengths
    N = tok.size
    frames = None                                          # with split: (t per grid row, their sum)
    if split and n_vid_grid:
        check_grid("video_grid_thw", video_grid, m)        # t >= 1 before t counts runs
        frames = (video_grid[:, 0], sum(video_grid[:, 0].tolist()))
        n_vid_grid = frames[1]
        if n_vid_grid <= N:                                # else too many runs: reported below
            video_grid = np.repeat(video_grid, frames[0], axis=0)
            video_grid[:, 0] = 1
    if N == 0:
        if n_img_grid or n_vid_grid:
            _count_error(np.zeros(0, np.int8), np.zeros(0, np.int64), B, 0, 0, n_img_grid, n_vid_grid, frames)
        return np.full((3, B, S), pad_position, dtype=np.int64), np.zeros((B, 1), dtype=np.int64)

    # Segments: a new one begins where the token type changes or a row begins.
    is_img, is_vid = tok == image_token_id, tok == video_token_id
    typ = is_img.view(np.int8) + 2 * is_vid.view(np.int8)
    first = np.empty(N, dtype=bool)
    first[0] = True
    np.not_equal(typ[1:], typ[:-1], out=first[1:])
    first[row_start[lengths > 0] if mask is not None else row_start] = True
    starts = np.flatnonzero(first)
    seg_len = np.empty_like(starts)
    np.subtract(starts[1:], starts[:-1], out=seg_len[:-1])
    seg_len[-1] = N - starts[-1]
    seg_typ = typ[starts]
    # Row of each segment (empty rows share their row_start with the next row: take the last).
    seg_row = starts // S if mask is None else np.searchsorted(row_start, starts, side="right") - 1

    # Vision runs take grid rows in batch order, images and videos each from their own list.
    vseg = np.flatnonzero(seg_typ)
    kinds = seg_typ[vseg]
    n_img = int(np.count_nonzero(kinds == 1))
    n_vid = vseg.size - n_img
    if n_img != n_img_grid or n_vid != n_vid_grid:
        _count_error(seg_typ, seg_row, B, n_img, n_vid, n_img_grid, n_vid_grid, frames)
    if n_vid == 0:
        grid = image_grid
        check_grid("image_grid_thw", grid, m)
    elif n_img == 0:
        grid = video_grid
        check_grid("video_grid_thw", grid, m)
    else:
        check_grid("image_grid_thw", image_grid, m)
        check_grid("video_grid_thw", video_grid, m)
        grid = np.empty((vseg.size, 3), dtype=np.int64)
        grid[kinds == 1] = image_grid
        grid[kinds == 2] = video_grid
    extent = seg_len - 1                                   # text: offsets 0..len-1
    if vseg.size:
        vt, vh, vw = grid[:, 0], grid[:, 1] // m, grid[:, 2] // m
        vlen = seg_len[vseg]
        # in float64: exact up to 2^53 (a run is at most S < 2^53 tokens), and no int64 wrap-around that
        # could make an absurd grid "need" exactly a run's length
        bad = vlen != vt.astype(np.float64) * vh * vw
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            s = vseg[i]
            name = "image" if kinds[i] == 1 else "video"
            k = int(np.count_nonzero(kinds[:i] == kinds[i]))
            _fail(f"row {int(seg_row[s])}: {name} run at token {int(starts[s] - row_start[seg_row[s]])}"
                  + ("" if mask is None else " (counting unpadded tokens)")
                  + f" has {int(vlen[i])} tokens but {grid_name(name, k, frames)} = {tuple(grid[i].tolist())} "
                  f"needs t·(h/{m})·(w/{m}) = {_tokens(grid[i], m)}")
        if vision_start_token_id is not None:
            vstart = starts[vseg]
            ok = tok[vstart - 1] == vision_start_token_id      # vstart - 1 = -1 wraps; caught below
            if mask is None:
                ok &= vstart % S != 0
            else:
                ok &= vstart != row_start[seg_row[vseg]]
            if not ok.all():
                s = vseg[np.flatnonzero(~ok)[0]]
                _fail(f"row {int(seg_row[s])}: vision run at token {int(starts[s] - row_start[seg_row[s]])}"
                      + ("" if mask is None else " (counting unpadded tokens)")
                      + " does not follow vision_start_token_id")
        # a vision run's extent is spatial only: the next segment starts at base + (max(H, W) − 1)·α + gap
        extent[vseg] = np.maximum(vh - 1, vw - 1) * stride
        top = extent.copy()                                # largest offset of each segment, t included
        if video_interval is None:
            top[vseg] = np.maximum(extent[vseg], vt - 1)
        else:
            is_v = kinds == 2
            iv = np.ones(vseg.size, dtype=np.float32)
            iv[is_v] = video_interval
            # stock: (torch.arange(t) * time_interval).long(): the float32 product (one rounding, the
            # same on every device), truncated. T(ti) grows with ti, so frame t−1 holds the largest.
            t_top = np.where(is_v, (vt - 1).astype(np.float32) * iv, vt - 1)
            check_time_offsets(t_top[is_v], vt[is_v], video_interval)
            top[vseg] = np.maximum(extent[vseg], t_top.astype(np.int64))
    else:
        top = extent

    # Bases: exclusive prefix sum of (extent + gap) over each row's segments.
    step = extent + gap
    excl = np.cumsum(step) - step
    row_first = np.searchsorted(starts, row_start)        # first segment of each row
    base = excl - excl[row_first[seg_row]]

    # Tokens: the text rule everywhere (base + index inside the segment), then vision tokens.
    pos = np.empty((3, N), dtype=np.int64)
    rows = list(pos)
    np.add(_arange(N), np.repeat(base - starts, seg_len), out=rows[0])
    rows[1][:] = rows[0]
    rows[2][:] = rows[0]
    if vseg.size:
        at = np.flatnonzero(is_img | is_vid)               # vision tokens, run after run (bool: 10x faster)
        r = at - np.repeat(starts[vseg], vlen)             # index inside the run
        hw = np.repeat(vh * vw, vlen)
        w_cnt = np.repeat(vw, vlen)
        b = np.repeat(base[vseg], vlen)
        ti = r // hw
        rem = r - ti * hw
        hi = rem // w_cnt
        if video_interval is not None:
            vid = np.repeat(kinds == 2, vlen)
            ti[vid] = (ti[vid].astype(np.float32) * np.repeat(iv, vlen)[vid]).astype(np.int64)  # as t_top
        rows[0][at] = b + ti
        rows[1][at] = b + hi * stride
        rows[2][at] = b + (rem - hi * w_cnt) * stride

    # rope_deltas: the largest position of a row, the max over its segments of base + largest offset (a
    # video's frames can reach past the segments after it).
    deltas = np.zeros((B, 1), dtype=np.int64)
    seg_top = base + top
    if mask is None:
        deltas[:, 0] = np.maximum.reduceat(seg_top, row_first) + 1 - S
        return pos.reshape(3, B, S), deltas
    filled = lengths > 0
    deltas[filled, 0] = np.maximum.reduceat(seg_top, row_first[filled]) + 1 - lengths[filled]
    out = np.full((3, B * S), pad_position, dtype=np.int64)
    flat_mask = mask.reshape(-1)
    for row in range(3):   # one boolean assignment per position row (2-D fancy indexing is slower)
        out[row][flat_mask] = rows[row]
    return out.reshape(3, B, S), deltas


def _count_error(seg_typ, seg_row, B, n_img, n_vid, n_img_grid, n_vid_grid, frames=None):
    for kind, name, n_runs, n_grid in ((1, "image", n_img, n_img_grid), (2, "video", n_vid, n_vid_grid)):
        if n_runs != n_grid:
            per_row = np.bincount(seg_row[seg_typ == kind], minlength=B)
            row = int(np.flatnonzero(np.cumsum(per_row) > n_grid)[0]) if n_runs > n_grid else B - 1
            _fail(f"input_ids has {n_runs} {name} runs but {grid_count(name, n_grid, kind == 2 and frames)}; "
                  f"{name} runs per row: {per_row.tolist()}; the mismatch shows at row {row} "
                  f"({int(per_row[row])} {name} run(s) there)")


def grid_count(name: str, n_grid: int, frames) -> str:
    """'video_grid_thw has 3 rows', or with split frames how many frames they hold."""
    if frames:
        return (f"{name}_grid_thw has {len(frames[0])} rows of {n_grid} frames in all (split_video_frames: "
                "one video run per frame)")
    return f"{name}_grid_thw has {n_grid} rows"


def grid_name(name: str, k: int, frames) -> str:
    """'image_grid_thw[k]' of the k-th run; with split frames the row and frame of the k-th video run."""
    if name == "video" and frames:
        ends = np.cumsum(frames[0])
        row = int(np.searchsorted(ends, k, side="right"))
        return f"video_grid_thw[{row}] frame {k - int(ends[row] - frames[0][row])} (split_video_frames)"
    return f"{name}_grid_thw[{k}]"


def check_interval(interval: np.ndarray) -> None:
    """Time intervals finite and >= 0, else ValueError naming the first bad one."""
    bad = ~np.isfinite(interval) | (interval < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        _fail(f"video_time_interval[{i}] = {float(interval[i]):.8g}: time intervals must be finite and >= 0")


def check_time_offsets(t_top: np.ndarray, t: np.ndarray, interval: np.ndarray) -> None:
    """The last frame's temporal offset float32(t − 1)·interval of every video below 2^53 (positions stay
    exact in int64 and the device path's float64), else ValueError naming the video."""
    bad = t_top >= 2.0**53
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        _fail(f"video_time_interval[{i}] = {float(interval[i]):.8g} puts frame {int(t[i]) - 1} of video_grid_thw[{i}] "
              f"at temporal offset {float(t_top[i]):.4g}, beyond 2^53")
