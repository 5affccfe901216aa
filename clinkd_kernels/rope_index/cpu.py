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
runs over tokens, segments or rows. At training shapes this is per-op-cost bound, and NumPy's per-op
overhead on small arrays is lower than PyTorch's: that is why the CPU path is NumPy.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .checks import check_grid, check_interval, check_time_offsets, grid_count, grid_name, grid_tokens


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


class _Stream(NamedTuple):
    """The batch as one stream of kept tokens, row after row (padding removed)."""

    tok: np.ndarray  # [N] token ids
    lengths: np.ndarray  # [B] kept tokens of each row
    row_start: np.ndarray  # [B] stream index of each row's first token


class _Segments(NamedTuple):
    """Maximal runs of one token type (text 0, image 1, video 2); a row's start also starts one."""

    starts: np.ndarray  # [n_seg] stream index of each segment's first token
    length: np.ndarray  # [n_seg] tokens of each segment
    typ: np.ndarray  # [n_seg] int8 token type
    row: np.ndarray  # [n_seg] row of each segment


def mcg_rope_index_cpu(
    ids: np.ndarray,
    image_grid: np.ndarray | None,
    video_grid: np.ndarray | None,
    mask: np.ndarray | None,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int | None,
    m: int,
    gap: int,
    stride: int,
    pad_position: int,
    video_interval: np.ndarray | None = None,
    split: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
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
            raise ValueError(
                f"video_time_interval has {video_interval.size} values but video_grid_thw has {n_vid_grid} rows"
            )
        if n_vid_grid == 0:
            video_interval = None
    stream = _stream(ids, mask)
    N = stream.tok.size
    frames = None  # with split: (t per grid row, their sum)
    if split and n_vid_grid:
        check_grid("video_grid_thw", video_grid, m)  # t >= 1 before t counts runs
        frames = (video_grid[:, 0], sum(video_grid[:, 0].tolist()))
        n_vid_grid = frames[1]
        if n_vid_grid <= N:  # else too many runs: reported below
            video_grid = np.repeat(video_grid, frames[0], axis=0)
            video_grid[:, 0] = 1
    if N == 0:
        if n_img_grid or n_vid_grid:
            _count_error(np.zeros(0, np.int8), np.zeros(0, np.int64), B, 0, 0, n_img_grid, n_vid_grid, frames)
        return np.full((3, B, S), pad_position, dtype=np.int64), np.zeros((B, 1), dtype=np.int64)

    is_img, is_vid = stream.tok == image_token_id, stream.tok == video_token_id
    seg = _segments(is_img.view(np.int8) + 2 * is_vid.view(np.int8), stream, S, masked=mask is not None)
    # Vision runs take grid rows in batch order, images and videos each from their own list.
    vseg = np.flatnonzero(seg.typ)
    kinds = seg.typ[vseg]
    n_img = int(np.count_nonzero(kinds == 1))
    n_vid = vseg.size - n_img
    if n_img != n_img_grid or n_vid != n_vid_grid:
        _count_error(seg.typ, seg.row, B, n_img, n_vid, n_img_grid, n_vid_grid, frames)
    grid = _run_grids(kinds, image_grid, video_grid, m, n_img, n_vid)
    extent = seg.length - 1  # text: offsets 0..len-1
    top, iv = extent, None
    if vseg.size:
        _check_runs(seg, stream, vseg, kinds, grid, frames, m, S, vision_start_token_id, masked=mask is not None)
        top, iv = _vision_extents(extent, vseg, kinds, grid, m, stride, video_interval)

    # Bases: exclusive prefix sum of (extent + gap) over each row's segments.
    step = extent + gap
    excl = np.cumsum(step) - step
    row_first = np.searchsorted(seg.starts, stream.row_start)  # first segment of each row
    base = excl - excl[row_first[seg.row]]
    pos = _token_positions(seg, base, vseg, kinds, grid, m, stride, iv, is_img | is_vid, N)
    return _place(pos, base + top, row_first, stream.lengths, mask, pad_position, B, S)


def _stream(ids: np.ndarray, mask: np.ndarray | None) -> _Stream:
    """The kept tokens of ids [B,S] (mask [B,S] bool, or None: all), row after row."""
    B, S = ids.shape
    if mask is None:
        return _Stream(ids.reshape(-1), np.full(B, S, dtype=np.int64), _arange(B) * S)
    lengths = mask.sum(1, dtype=np.int64)
    return _Stream(ids.reshape(-1)[mask.reshape(-1)], lengths, np.cumsum(lengths) - lengths)


def _segments(typ: np.ndarray, stream: _Stream, S: int, *, masked: bool) -> _Segments:
    """Segments of the stream of token types typ [N] int8: a new one where the type changes or a row begins."""
    N = typ.size
    first = np.empty(N, dtype=bool)
    first[0] = True
    np.not_equal(typ[1:], typ[:-1], out=first[1:])
    first[stream.row_start[stream.lengths > 0] if masked else stream.row_start] = True
    starts = np.flatnonzero(first)
    seg_len = np.empty_like(starts)
    np.subtract(starts[1:], starts[:-1], out=seg_len[:-1])
    seg_len[-1] = N - starts[-1]
    # Row of each segment (empty rows share their row_start with the next row: take the last).
    seg_row = np.searchsorted(stream.row_start, starts, side="right") - 1 if masked else starts // S
    return _Segments(starts, seg_len, typ[starts], seg_row)


def _run_grids(kinds, image_grid, video_grid, m: int, n_img: int, n_vid: int) -> np.ndarray | None:
    """The grid row (t, h, w) [n_runs, 3] of each vision run (kinds [n_runs]: 1 image, 2 video), grids checked."""
    if n_vid == 0:
        check_grid("image_grid_thw", image_grid, m)
        return image_grid
    if n_img == 0:
        check_grid("video_grid_thw", video_grid, m)
        return video_grid
    check_grid("image_grid_thw", image_grid, m)
    check_grid("video_grid_thw", video_grid, m)
    grid = np.empty((kinds.size, 3), dtype=np.int64)
    grid[kinds == 1] = image_grid
    grid[kinds == 2] = video_grid
    return grid


def _check_runs(
    seg: _Segments,
    stream: _Stream,
    vseg,
    kinds,
    grid,
    frames,
    m: int,
    S: int,
    vision_start_token_id: int | None,
    *,
    masked: bool,
) -> None:
    """Every vision run has t·(h/m)·(w/m) tokens and, with ``vision_start_token_id``, follows that token."""
    vt, vh, vw = grid[:, 0], grid[:, 1] // m, grid[:, 2] // m
    vlen = seg.length[vseg]
    where = "" if not masked else " (counting unpadded tokens)"
    # in float64: exact up to 2^53 (a run is at most S < 2^53 tokens), and no int64 wrap-around that
    # could make an absurd grid "need" exactly a run's length
    bad = vlen != vt.astype(np.float64) * vh * vw
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        s = vseg[i]
        name = "image" if kinds[i] == 1 else "video"
        k = int(np.count_nonzero(kinds[:i] == kinds[i]))
        at = int(seg.starts[s] - stream.row_start[seg.row[s]])
        raise ValueError(
            f"row {int(seg.row[s])}: {name} run at token {at}{where} has {int(vlen[i])} tokens but "
            f"{grid_name(name, k, frames)} = {tuple(grid[i].tolist())} needs t·(h/{m})·(w/{m}) = "
            f"{grid_tokens(grid[i], m)}"
        )
    if vision_start_token_id is None:
        return
    vstart = seg.starts[vseg]
    ok = stream.tok[vstart - 1] == vision_start_token_id  # vstart - 1 = -1 wraps; caught below
    if masked:
        ok &= vstart != stream.row_start[seg.row[vseg]]
    else:
        ok &= vstart % S != 0
    if not ok.all():
        s = vseg[np.flatnonzero(~ok)[0]]
        at = int(seg.starts[s] - stream.row_start[seg.row[s]])
        raise ValueError(
            f"row {int(seg.row[s])}: vision run at token {at}{where} does not follow vision_start_token_id"
        )


def _vision_extents(extent, vseg, kinds, grid, m: int, stride: int, video_interval):
    """Sets the vision segments' extents (in place) and returns (top, iv): top [n_seg] the largest offset of
    each segment, t included; iv float32 [n_runs] the time interval of each vision run (None without)."""
    vt, vh, vw = grid[:, 0], grid[:, 1] // m, grid[:, 2] // m
    # a vision run's extent is spatial only: the next segment starts at base + (max(H, W) − 1)·α + gap
    extent[vseg] = np.maximum(vh - 1, vw - 1) * stride
    top = extent.copy()  # largest offset of each segment, t included
    if video_interval is None:
        top[vseg] = np.maximum(extent[vseg], vt - 1)
        return top, None
    is_v = kinds == 2
    iv = np.ones(vseg.size, dtype=np.float32)
    iv[is_v] = video_interval
    # stock: (torch.arange(t) * time_interval).long(): the float32 product (one rounding, the
    # same on every device), truncated. T(ti) grows with ti, so frame t−1 holds the largest.
    t_top = np.where(is_v, (vt - 1).astype(np.float32) * iv, vt - 1)
    check_time_offsets(t_top[is_v], vt[is_v], video_interval)
    top[vseg] = np.maximum(extent[vseg], t_top.astype(np.int64))
    return top, iv


def _token_positions(seg: _Segments, base, vseg, kinds, grid, m: int, stride: int, iv, is_vision, N: int):
    """int64 [3, N] positions of the stream: the text rule everywhere (base + index inside the segment),
    then the vision tokens (base + (T(ti), hi·α, wi·α))."""
    pos = np.empty((3, N), dtype=np.int64)
    rows = list(pos)
    np.add(_arange(N), np.repeat(base - seg.starts, seg.length), out=rows[0])
    rows[1][:] = rows[0]
    rows[2][:] = rows[0]
    if not vseg.size:
        return pos
    vh, vw = grid[:, 1] // m, grid[:, 2] // m
    vlen = seg.length[vseg]
    at = np.flatnonzero(is_vision)  # vision tokens, run after run (a bool mask: fastest)
    r = at - np.repeat(seg.starts[vseg], vlen)  # index inside the run
    hw = np.repeat(vh * vw, vlen)
    w_cnt = np.repeat(vw, vlen)
    b = np.repeat(base[vseg], vlen)
    ti = r // hw
    rem = r - ti * hw
    hi = rem // w_cnt
    if iv is not None:
        vid = np.repeat(kinds == 2, vlen)
        ti[vid] = (ti[vid].astype(np.float32) * np.repeat(iv, vlen)[vid]).astype(np.int64)  # as t_top
    rows[0][at] = b + ti
    rows[1][at] = b + hi * stride
    rows[2][at] = b + (rem - hi * w_cnt) * stride
    return pos


def _place(pos, seg_top, row_first, lengths, mask, pad_position: int, B: int, S: int):
    """(positions [3,B,S], deltas [B,1]) from the stream's positions pos [3, N] and each segment's largest
    position seg_top [n_seg]; padding gets ``pad_position``.

    rope_deltas: the largest position of a row, the max over its segments of base + largest offset (a
    video's frames can reach past the segments after it), + 1 − the row's token count.
    """
    deltas = np.zeros((B, 1), dtype=np.int64)
    if mask is None:
        deltas[:, 0] = np.maximum.reduceat(seg_top, row_first) + 1 - S
        return pos.reshape(3, B, S), deltas
    filled = lengths > 0
    deltas[filled, 0] = np.maximum.reduceat(seg_top, row_first[filled]) + 1 - lengths[filled]
    out = np.full((3, B * S), pad_position, dtype=np.int64)
    flat_mask = mask.reshape(-1)
    for row in range(3):  # one boolean assignment per position row (2-D fancy indexing is slower)
        out[row][flat_mask] = pos[row]
    return out.reshape(3, B, S), deltas


def _count_error(seg_typ, seg_row, B, n_img, n_vid, n_img_grid, n_vid_grid, frames=None):
    """ValueError naming the first row where the image or video runs outrun their grid rows."""
    for kind, name, n_runs, n_grid in ((1, "image", n_img, n_img_grid), (2, "video", n_vid, n_vid_grid)):
        if n_runs != n_grid:
            per_row = np.bincount(seg_row[seg_typ == kind], minlength=B)
            row = int(np.flatnonzero(np.cumsum(per_row) > n_grid)[0]) if n_runs > n_grid else B - 1
            grids = grid_count(name, n_grid, kind == 2 and frames)
            raise ValueError(
                f"input_ids has {n_runs} {name} runs but {grids}; {name} runs per row: "
                f"{per_row.tolist()}; the mismatch shows at row {row} ({int(per_row[row])} {name} "
                "run(s) there)"
            )
