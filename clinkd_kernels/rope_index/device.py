"""MCG-RoPE position indices with PyTorch tensor ops on the tensors' device (the path of CUDA tensors).

    input_ids [B,S] → position_ids [3,B,S] (rows t, h, w), rope_deltas [B,1]     (int64)

Same rules as ``op.py``. No Triton kernel: the op moves a few bytes per token and is bound by the
number of launches, which a handful of whole-batch tensor ops keep small. Works per token, all rows
at once, so nothing leaves the device except one small tensor of check results (one host sync per
call):

    r      = index of a token inside its segment (a cummax over segment starts)
    offset = (r, r, r) for text, (T(ti), hi·α, wi·α) for vision,   r = (ti·H + hi)·W + wi
    base   = exclusive prefix sum (cumsum along the row) of (extent + gap) placed at segment ends

T(ti) = ti, or int(float32(ti)·float32(interval)) for a video with a time interval. At the last
token of a well-formed vision run the offsets are (T(t-1), (H-1)·α, (W-1)·α), each the largest of
its run: a segment's (spatial) extent is max(h, w offset) there, and a row's largest position is
the max over its segment ends. The k-th image run of the flattened batch uses image_grid_thw[k]
(likewise videos; with split_video_frames the k-th video run is a frame of the grid row whose
cumulative frame count first exceeds k), found from a running count of run starts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .checks import check_grid, check_interval, check_time_offsets, grid_count, grid_name, grid_tokens

_PAD = 3  # token code of padding after compaction (text 0, image 1, video 2)
_VSTART = 4  # bit set in the code of a vision_start token
READ_CPU_GRIDS = True  # CPU grids/intervals read on the host; tests set False to run the device-grid code on CPU


def _upload(data, dtype: torch.dtype, device) -> torch.Tensor:
    """Host data → ``device`` without a sync: a pageable host-to-CUDA copy waits for the stream."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _grid_table(
    grid: torch.Tensor | None,
    m: int,
    dtype: torch.dtype,
    device,
    *,
    split: bool = False,
    interval: torch.Tensor | None = None,
    with_interval: bool = False,
    limit: int = 0,
):
    """A grid's rows as columns (H·W, W, t·H·W[, interval]) of ``dtype`` [3 or 4, n], H = h/m, W = w/m.

    Returns (table, bad, n_runs, frame_ends):
      bad        how many rows (and intervals) are bad: an int, or a device tensor;
      n_runs     how many runs the grid feeds: its row count, or with ``split`` its frame count
                 (an int, or a device tensor);
      frame_ends with ``split`` and a grid on the device: cumulative frame counts [n] (the k-th run
                 is a frame of row searchsorted(frame_ends, k, right)), else None.
    With ``split`` every row is t rows (1, h, w); a CPU grid is expanded on the host (unless it holds
    more than ``limit`` frames, which no batch can match), a device grid keeps its rows with t := 1.
    ``with_interval`` adds the row of time intervals: ``interval`` [n] (videos) or 1 (images).

    Divisors are clamped to ≥ 1 so a bad grid cannot divide by zero before the checks report it.
    An absent grid gives one row that matches no run (t = 0). A CPU grid (the processor's output)
    is read on the host: a handful of rows, far cheaper as Python numbers than as tensor ops.
    """
    if grid is None or grid.shape[0] == 0:
        return _upload([[1], [1], [0]] + ([[1.0]] if with_interval else []), dtype, device), 0, 0, None
    frame_ends = None
    if grid.device.type == "cpu" and READ_CPU_GRIDS:
        rows = grid.tolist()
        bad = sum(h % m != 0 or w % m != 0 or t < 1 or h < m or w < m for t, h, w in rows)
        n_runs = len(rows)
        if split:
            n_runs = sum(t for t, _, _ in rows)
            rows = [] if bad or n_runs > limit else [(1, h, w) for t, h, w in rows for _ in range(t)]
            rows = rows or [(0, m, m)]
        cols = [
            [max(1, (h // m) * (w // m)) for _, h, w in rows],
            [max(1, w // m) for _, _, w in rows],
            [t * (h // m) * (w // m) for t, h, w in rows],
        ]
        if with_interval and (interval is None or interval.device.type == "cpu"):
            ivs = [1.0] * len(rows) if interval is None else interval.tolist()
            bad += sum(not math.isfinite(v) or v < 0 for v in ivs)
            return _upload(cols + [ivs], dtype, device), bad, n_runs, None
        table = _upload(cols, dtype, device)
    else:
        g = grid.to(device=device, dtype=torch.long)
        t, h, w = g.unbind(1)
        H, W = h // m, w // m
        bad = ((h % m != 0) | (w % m != 0) | (t < 1) | (h < m) | (w < m)).sum()
        n_runs = g.shape[0]
        if split:
            frame_ends = t.cumsum(0)
            n_runs = frame_ends[-1]
            t = torch.ones_like(t)
        table = torch.stack([(H * W).clamp(min=1), W.clamp(min=1), t * H * W]).to(dtype)
    if with_interval:  # a device grid, or a device interval
        if interval is None:
            iv = torch.ones(table.shape[1], dtype=dtype, device=device)
        else:
            iv = _upload(interval, interval.dtype, device) if interval.device.type == "cpu" else interval.to(device)
            bad = bad + (~torch.isfinite(iv) | (iv < 0)).sum()
        table = torch.cat([table, iv.to(dtype).unsqueeze(0)])
    return table, bad, n_runs, frame_ends


def _read(values: list) -> list[int]:
    """The one host sync: the device values (0-dim int64 tensors) of ``values`` read at once; ints pass."""
    dev = [v for v in values if isinstance(v, torch.Tensor)]
    got = iter(torch.stack(dev).tolist() if dev else ())
    return [next(got) if isinstance(v, torch.Tensor) else v for v in values]


def _as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool → float; through an int8 view, which CPU kernels convert faster than bool."""
    return mask.view(torch.int8).to(dtype)


class _Tokens(NamedTuple):
    """Per-token masks [B,S] of the batch, padding moved to each row's end (order kept)."""

    typ: torch.Tensor  # int8 token type: text 0, image 1, video 2, padding _PAD
    is_img: torch.Tensor  # bool
    is_vid: torch.Tensor  # bool
    is_vs: torch.Tensor | None  # bool vision_start tokens (None without vision_start_token_id)
    valid: torch.Tensor | None  # bool attention_mask != 0, in the input layout (None without a mask)
    cidx: torch.Tensor | None  # int64 compacted column of each kept token (-1 before a row's first)
    lengths: torch.Tensor | None  # int64 [B] kept tokens of each row


def mcg_rope_index_device(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int | None,
    spatial_merge_size: int,
    modality_gap: int,
    vision_stride: int,
    pad_position: int,
    video_time_interval: torch.Tensor | None = None,
    split_video_frames: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mcg_rope_index`` on the tensors' device (inputs already validated); any device works.

    input_ids [B,S], grids int [n,3], attention_mask [B,S] or None → position_ids int64 [3,B,S],
    rope_deltas int64 [B,1]. video_time_interval: float32 [N_vid] (on the CPU or the device), or None;
    split_video_frames: each video grid row is one run per frame. See ``op.py`` for the rules.

    At training shapes this is bound by per-op cost (kernel launches), not memory, so it keeps the
    op count low, and does its arithmetic in floats: integer division is slow everywhere, and a
    float division followed by floor is exact here. Bases and spatial positions never exceed
    S·(stride + gap), so float32 holds them exactly when S·(stride + gap + 1) < 2^23; float64 is used
    beyond that. Temporal offsets with a time interval are float32 products truncated (as stock),
    integers a float32 (or float64) holds exactly; they are added to the bases in int64.
    """
    B, S = input_ids.shape
    dev = input_ids.device
    m, gap, stride = spatial_merge_size, modality_gap, vision_stride
    fdt = torch.float32 if S * (stride + gap + 1) < 2**23 else torch.float64
    if split_video_frames and video_time_interval is not None:
        raise ValueError("video_time_interval with split_video_frames=True: no Qwen-VL family does both")
    tk = _compact(input_ids, attention_mask, image_token_id, video_token_id, vision_start_token_id)
    start, end = _segment_bounds(tk)
    idx = torch.arange(S, dtype=fdt, device=dev)
    r = idx - (idx * _as_float(start, fdt)).cummax(1).values  # offset inside the segment

    n_img_grid = 0 if image_grid_thw is None else image_grid_thw.shape[0]
    n_vid_grid = 0 if video_grid_thw is None else video_grid_thw.shape[0]
    timed = video_time_interval is not None and n_vid_grid > 0
    hw, w_cnt, count, iv, n_img, n_vid, bad_grid, n_vid_runs = _token_grids(
        tk, start, image_grid_thw, video_grid_thw, m, fdt, split_video_frames, video_time_interval, timed
    )

    # Offsets inside the segment: (r, r, r) for text, (ti, hi·α, wi·α) for vision, r = (ti·H + hi)·W + wi.
    # ([B,S]-sized ops throughout, never [3,B,S]: small CPU ops stay single-threaded, which is faster.)
    ti = (r / hw).floor_()
    rem = r - ti * hw
    hi = (rem / w_cnt).floor_()
    wi = rem.sub_(hi * w_cnt)
    tv, bad_time = None, 0
    if timed:
        # Stock: (torch.arange(t) * time_interval).long() promotes the int64 frame index to float32 and
        # multiplies by the float32 interval: one correctly rounded float32 product (bitwise the same on
        # CPU and CUDA), truncated toward zero. Here: the same product of the same two float32 values,
        # then trunc. ti is exact in fdt, so its float32 cast is stock's. The result is an integer held
        # exactly by float32 and fdt; checked below 2^53 so int64 positions stay exact.
        tv = torch.mul(ti.to(torch.float32), iv.to(torch.float32)).trunc_().to(fdt)
        bad_time = ((tv >= 2.0**53) & end & tk.is_vid).sum()
    vis = tk.is_img | tk.is_vid
    rel = _relative_positions(r, (ti, hi, wi), vis, stride, tv, tk.is_vid)
    base, top = _bases(rel, end, gap, fdt, timed)

    # The one host sync: every check at once. A vision run is well formed iff its length r+1 at its
    # last token equals t·H·W of its grid; with vision_start_token_id every vision run follows one.
    bad = ((r + 1 != count) & end & vis).sum()
    if tk.is_vs is not None:
        vs_ok = (start[:, 1:] & vis[:, 1:] & tk.is_vs[:, :-1]).sum()  # counted against the run total
    else:
        vs_ok = n_img + n_vid
    got = _read([n_img, n_vid, bad, vs_ok, bad_grid, n_vid_runs, bad_time])
    if got[0] != n_img_grid or got[1] != got[5] or got[2] or got[3] != got[0] + got[1] or got[4] or got[6]:
        _raise_index_error(
            got,
            n_img_grid,
            start,
            tk.typ,
            r,
            end,
            vis,
            count,
            tk.is_vs,
            image_grid_thw,
            video_grid_thw,
            video_time_interval,
            split_video_frames,
            m,
            tk.valid is not None,
        )
    return _assemble(rel, base, top, end, tk, timed, pad_position)


def _compact(
    input_ids, attention_mask, image_token_id: int, video_token_id: int, vision_start_token_id: int | None
) -> _Tokens:
    """Token types of input_ids [B,S]. Padding is removed by moving each row's kept tokens to its front
    (order kept); the tail gets the padding code. Positions are computed on this compact layout and
    gathered back at the end."""
    B, S = input_ids.shape
    dev = input_ids.device
    is_img = input_ids == image_token_id
    is_vid = input_ids == video_token_id
    is_vs = None if vision_start_token_id is None else input_ids == vision_start_token_id
    if attention_mask is None:
        return _Tokens(is_img.view(torch.int8) + 2 * is_vid.view(torch.int8), is_img, is_vid, is_vs, None, None, None)
    valid = attention_mask.to(device=dev) != 0
    cidx = valid.cumsum(1) - 1
    lengths = cidx[:, -1] + 1
    code = is_img.view(torch.int8) + 2 * is_vid.view(torch.int8)
    if is_vs is not None:
        code += _VSTART * is_vs.view(torch.int8)
    code = torch.full((B, S + 1), _PAD, dtype=torch.int8, device=dev).scatter_(1, cidx.masked_fill(~valid, S), code)[
        :, :S
    ]
    typ = code & 3
    if is_vs is not None:
        is_vs = (code & _VSTART) != 0
    return _Tokens(typ, typ == 1, typ == 2, is_vs, valid, cidx, lengths)


def _segment_bounds(tk: _Tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) bool [B,S]: the first and the last token of each segment, a maximal run of one token
    type (text 0, image 1, video 2). A segment ends where the next one starts or at the row's end."""
    typ = tk.typ
    first = torch.empty(typ.shape, dtype=torch.bool, device=typ.device)
    first[:, 0] = True
    torch.ne(typ[:, 1:], typ[:, :-1], out=first[:, 1:])
    end = torch.empty_like(first)
    end[:, -1] = True
    end[:, :-1] = first[:, 1:]
    if tk.valid is None:
        return first, end
    is_tok = typ != _PAD
    return first & is_tok, end & is_tok


def _token_grids(
    tk: _Tokens, start, image_grid_thw, video_grid_thw, m: int, fdt: torch.dtype, split: bool, interval, timed: bool
):
    """The grid of every token, as [B,S] columns of ``fdt``: (H·W, W, t·H·W, interval or None), and the
    counts the checks read: (…, n_img, n_vid, bad_grid, n_vid_runs), device tensors or ints.

    The k-th image run of the batch uses image_grid_thw[k] (same for video; with split frames, the row
    of the k-th frame). Text tokens look up some row too; their values are never used.
    """
    B, S = start.shape
    dev = start.device
    n_vid_grid = 0 if video_grid_thw is None else video_grid_thw.shape[0]
    img_rank = (start & tk.is_img).view(-1).cumsum(0)
    n_img = img_rank[-1]
    table, bad_grid, _, _ = _grid_table(image_grid_thw, m, fdt, dev, with_interval=timed)
    rank = (img_rank - 1).clamp_(0, table.shape[1] - 1)
    n_vid_runs = 0  # the video runs the grid feeds
    if n_vid_grid:
        vid_rank = (start & tk.is_vid).view(-1).cumsum(0)
        n_vid = vid_rank[-1]
        vid_table, vid_bad, n_vid_runs, frame_ends = _grid_table(
            video_grid_thw, m, fdt, dev, split=split, interval=interval, with_interval=timed, limit=B * S
        )
        k = vid_rank - 1
        if frame_ends is not None:
            k = torch.searchsorted(frame_ends, k, right=True)
        rank = torch.where(tk.is_vid.view(-1), k.clamp_(0, vid_table.shape[1] - 1) + table.shape[1], rank)
        table, bad_grid = torch.cat([table, vid_table], 1), bad_grid + vid_bad
    else:
        n_vid = (start & tk.is_vid).sum()
    hw, w_cnt, count, *iv = (col.index_select(0, rank).view(B, S) for col in table)
    return hw, w_cnt, count, (iv[0] if iv else None), n_img, n_vid, bad_grid, n_vid_runs


def _relative_positions(r, offsets, vis, stride: int, tv, is_vid) -> list[torch.Tensor]:
    """Each token's (t, h, w) position relative to its segment's base, three [B,S] tensors: r for text,
    (ti, hi·α, wi·α) for vision, the timed temporal offsets tv for videos with an interval."""
    visf = _as_float(vis, r.dtype)
    rel = []
    for row, off in enumerate(offsets):
        if row and stride != 1:
            off = off * stride
        rel.append(torch.addcmul(r, visf, off.sub_(r)))
    if tv is not None:
        rel[0] = torch.where(is_vid, tv, rel[0])
    return rel


def _bases(rel, end, gap: int, fdt: torch.dtype, timed: bool):
    """(base [B,S], top [B] or None): each token's segment base, and without a time interval each row's
    largest position (with one it is taken over the int64 positions by ``_assemble``).

    Segment bases: exclusive prefix sum of (extent + gap) over the segment ends of the row. The
    extent is spatial only: the h and w offsets at the run's last token, (H-1)·α and (W-1)·α (text:
    r there, its length − 1). Every segment has its largest t, h and w at its last token; without a time
    interval every position is exact in fdt.
    """
    spatial = torch.maximum(rel[1], rel[2])
    endf = _as_float(end, fdt)
    step = torch.add(spatial, gap).mul_(endf)
    base = step.cumsum(1).sub_(step)
    top = None if timed else torch.maximum(spatial, rel[0], out=spatial).add_(base).mul_(endf).amax(1).long()
    return base, top


def _assemble(rel, base, top, end, tk: _Tokens, timed: bool, pad_position: int):
    """(position_ids int64 [3,B,S], rope_deltas int64 [B,1]) from the relative positions and the bases,
    gathered back to the input layout (padding gets ``pad_position``)."""
    B, S = base.shape
    pos = torch.empty((3, B, S), dtype=torch.long, device=base.device)
    if timed:  # int64 sum: a temporal offset may be beyond fdt's exact range for the sum
        torch.add(rel[0].long(), base.long(), out=pos[0])
    else:
        pos[0].copy_(rel[0].add_(base))
    for row in (1, 2):
        pos[row].copy_(rel[row].add_(base))
    if timed:
        top = torch.maximum(pos[0], pos[1])
        top = torch.maximum(top, pos[2], out=top).mul_(end).amax(1)
    if tk.valid is None:
        deltas = (top + (1 - S)).unsqueeze(1)
    else:
        deltas = torch.where(tk.lengths > 0, top + 1 - tk.lengths, 0).unsqueeze(1)
        pos = pos.gather(2, tk.cidx.clamp(min=0).expand(3, B, S)).masked_fill_(~tk.valid, pad_position)
    return pos, deltas


def _raise_index_error(
    got,
    n_img_grid,
    start,
    typ,
    r,
    end,
    vis,
    count,
    is_vs,
    image_grid_thw,
    video_grid_thw,
    video_time_interval,
    split,
    m,
    compacted,
):
    """Build the error message for a failed check (error path only: free to sync)."""
    where = " (counting unpadded tokens)" if compacted else ""
    host = {}
    for name, grid in (("image", image_grid_thw), ("video", video_grid_thw)):
        host[name] = None if grid is None else grid.long().cpu().numpy()
        check_grid(f"{name}_grid_thw", host[name], m)
    interval = None
    if video_time_interval is not None and host["video"] is not None and len(host["video"]):
        interval = video_time_interval.float().cpu().numpy()
        check_interval(interval)
    frames = None
    if split and host["video"] is not None and len(host["video"]):
        frames = (host["video"][:, 0], got[5])
    for kind, name, n_runs, n_grid in ((1, "image", got[0], n_img_grid), (2, "video", got[1], got[5])):
        if n_runs != n_grid:
            per_row = (start & (typ == kind)).sum(1).cpu()
            cum = per_row.cumsum(0)
            row = int((cum > n_grid).nonzero()[0]) if n_runs > n_grid else len(per_row) - 1
            raise ValueError(
                f"input_ids has {n_runs} {name} runs but {grid_count(name, n_grid, kind == 2 and frames)}"
                f"; {name} runs per row: {per_row.tolist()}; the mismatch shows at row {row} "
                f"({int(per_row[row])} {name} run(s) there)"
            )
    bad_len = end & vis & (r + 1 != count)
    if bool(bad_len.any()):
        b, i = bad_len.nonzero()[0].tolist()
        kind = int(typ[b, i])
        name = "image" if kind == 1 else "video"
        k = int((start & (typ == kind)).view(-1)[: b * typ.shape[1] + i + 1].sum()) - 1
        grid = host[name][k] if not (kind == 2 and frames) else _frame_row(host[name], k)
        raise ValueError(
            f"row {b}: {name} run at token {i - int(r[b, i])}{where} has {int(r[b, i]) + 1} tokens but "
            f"{grid_name(name, k, frames)} = {tuple(grid.tolist())} needs t·(h/{m})·(w/{m}) = "
            f"{grid_tokens(grid.tolist(), m)} tokens"
        )
    if is_vs is not None:
        prev_vs = F.pad(is_vs, (1, 0), value=False)[:, :-1]
        late = start & vis & ~prev_vs
        if bool(late.any()):
            b, i = late.nonzero()[0].tolist()
            raise ValueError(f"row {b}: vision run at token {i}{where} does not follow vision_start_token_id")
    if interval is not None:
        t = host["video"][:, 0]
        check_time_offsets((t - 1).astype(np.float32) * interval, t, interval)
    raise AssertionError("unreachable: a check failed without a message")  # pragma: no cover


def _frame_row(grid, k: int):
    """The grid row (1, h, w) of the k-th frame run of a split video grid."""
    row = grid[int(np.searchsorted(np.cumsum(grid[:, 0]), k, side="right"))].copy()
    row[0] = 1
    return row
