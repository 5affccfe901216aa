"""MCG-RoPE position indices with PyTorch tensor ops on the tensors' device (the path of CUDA tensors).

    input_ids [B,S] → position_ids [3,B,S] (rows t, h, w), rope_deltas [B,1]     (int64)

Same rules as ``op.py``. No Triton kernel: the op moves a few bytes per token and is bound by the
number of launches, which a handful of whole-batch tensor ops keep small. Works per token, all rows at once, so nothing leaves the device except one
small tensor of check results (one host sync per call):

    r      = index of a token inside its segment (a cummax over segment starts)
    offset = (r, r, r) for text, (ti, hi·α, wi·α) for vision,   r = (ti·H + hi)·W + wi
    base   = exclusive prefix sum (cumsum along the row) of (extent + gap) placed at segment ends

Because bases only grow, "largest position so far" is always the previous segment's base + extent.
At the last token of a well-formed vision run the offsets are (t-1, (H-1)·α, (W-1)·α), so a
segment's extent is the max of its last token's offsets. The k-th image run of the flattened batch
uses image_grid_thw[k] (likewise videos), found from a running count of run starts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu import _tokens, check_grid

_PAD = 3        # token code of padding after compaction (text 0, image 1, video 2)
_VSTART = 4     # bit set in the code of a vision_start token


def _upload(data, dtype: torch.dtype, device) -> torch.Tensor:
    """Host data → ``device`` without a sync: a pageable host-to-CUDA copy waits for the stream."""
    t = torch.tensor(data, dtype=dtype)
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _grid_table(grid: torch.Tensor | None, m: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, object]:
    """Columns (H·W, W, t·H·W) of a grid, H = h/m, W = w/m, as ``dtype`` [3, n]; and how many rows are bad.

    Divisors are clamped to ≥ 1 so a bad grid cannot divide by zero before the checks report it.
    An absent grid gives one row that matches no run (t = 0). A CPU grid (the processor's output)
    is read on the host: a handful of rows, far cheaper as Python numbers than as tensor ops.
    """
    if grid is None or grid.shape[0] == 0:
        return _upload([[1], [1], [0]], dtype, device), 0
    if grid.device.type == "cpu":
        rows = grid.tolist()
        cols = [[max(1, (h // m) * (w // m)) for _, h, w in rows], [max(1, w // m) for _, _, w in rows],
                [t * (h // m) * (w // m) for t, h, w in rows]]
        bad = sum(h % m != 0 or w % m != 0 or t < 1 or h < m or w < m for t, h, w in rows)
        return _upload(cols, dtype, device), bad
    g = grid.to(device=device, dtype=torch.long)
    t, h, w = g.unbind(1)
    H, W = h // m, w // m
    bad = ((h % m != 0) | (w % m != 0) | (t < 1) | (h < m) | (w < m)).sum()
    return torch.stack([(H * W).clamp(min=1), W.clamp(min=1), t * H * W]).to(dtype), bad


def _as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool → float; through an int8 view, which CPU kernels convert several times faster."""
    return mask.view(torch.int8).to(dtype)


def mcg_rope_index_device(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                          video_grid_thw: torch.Tensor | None, attention_mask: torch.Tensor | None,
                          image_token_id: int, video_token_id: int, vision_start_token_id: int | None,
                          spatial_merge_size: int, modality_gap: int, vision_stride: int,
                          pad_position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mcg_rope_index`` on the tensors' device (inputs already validated); any device works.

    At training shapes this is bound by per-op cost (kernel launches), not memory, so it keeps the
    op count low, and does its arithmetic in floats: integer division is slow everywhere, and a
    float division followed by floor is exact here. Positions never exceed S·(stride + gap), so
    float32 holds them exactly when S·(stride + gap + 1) < 2^23; float64 is used beyond that.
    """
    B, S = input_ids.shape
    dev = input_ids.device
    m, gap, stride = spatial_merge_size, modality_gap, vision_stride
    fdt = torch.float32 if S * (stride + gap + 1) < 2**23 else torch.float64

    is_img = input_ids == image_token_id
    is_vid = input_ids == video_token_id
    is_vs = None if vision_start_token_id is None else input_ids == vision_start_token_id

    # Padding is removed by moving each row's kept tokens to its front (order kept); the tail gets
    # the padding code. Positions are computed on this compact layout and gathered back at the end.
    valid = lengths = None
    if attention_mask is not None:
        valid = attention_mask.to(device=dev) != 0
        cidx = valid.cumsum(1) - 1
        lengths = cidx[:, -1] + 1
        code = is_img.view(torch.int8) + 2 * is_vid.view(torch.int8)
        if is_vs is not None:
            code += _VSTART * is_vs.view(torch.int8)
        code = torch.full((B, S + 1), _PAD, dtype=torch.int8, device=dev).scatter_(
            1, cidx.masked_fill(~valid, S), code)[:, :S]
        typ = code & 3
        is_img, is_vid = typ == 1, typ == 2
        if is_vs is not None:
            is_vs = (code & _VSTART) != 0
    else:
        typ = is_img.view(torch.int8) + 2 * is_vid.view(torch.int8)

    # Segments: maximal runs of one token type (text 0, image 1, video 2). A segment ends where the
    # next one starts or at the row's end.
    first = torch.empty((B, S), dtype=torch.bool, device=dev)
    first[:, 0] = True
    torch.ne(typ[:, 1:], typ[:, :-1], out=first[:, 1:])
    end = torch.empty_like(first)
    end[:, -1] = True
    end[:, :-1] = first[:, 1:]
    if valid is not None:
        is_tok = typ != _PAD
        start = first & is_tok
        end &= is_tok
    else:
        start = first
    idx = torch.arange(S, dtype=fdt, device=dev)
    r = idx - (idx * _as_float(start, fdt)).cummax(1).values    # offset inside the segment

    # Grid of every vision token: the k-th image run of the batch uses image_grid_thw[k] (same for
    # video). Text tokens look up some row too; their values are never used.
    img_rank = (start & is_img).view(-1).cumsum(0)
    n_img = img_rank[-1]
    table, bad_grid = _grid_table(image_grid_thw, m, fdt, dev)
    rank = (img_rank - 1).clamp_(0, table.shape[1] - 1)
    n_img_grid = 0 if image_grid_thw is None else image_grid_thw.shape[0]
    n_vid_grid = 0 if video_grid_thw is None else video_grid_thw.shape[0]
    if n_vid_grid:
        vid_rank = (start & is_vid).view(-1).cumsum(0)
        n_vid = vid_rank[-1]
        vid_table, vid_bad = _grid_table(video_grid_thw, m, fdt, dev)
        rank = torch.where(is_vid.view(-1), (vid_rank - 1).clamp_(0, n_vid_grid - 1) + table.shape[1], rank)
        table, bad_grid = torch.cat([table, vid_table], 1), bad_grid + vid_bad
    else:
        n_vid = (start & is_vid).sum()
    hw, w_cnt, count = (col.index_select(0, rank).view(B, S) for col in table)

    # Offsets inside the segment: (r, r, r) for text, (ti, hi·α, wi·α) for vision, r = (ti·H + hi)·W + wi.
    # ([B,S]-sized ops throughout, never [3,B,S]: small CPU ops stay single-threaded, which is faster.)
    ti = (r / hw).floor_()
    rem = r - ti * hw
    hi = (rem / w_cnt).floor_()
    wi = rem.sub_(hi * w_cnt)
    vis = is_img | is_vid
    visf = _as_float(vis, fdt)
    rel = []
    for row, off in enumerate((ti, hi, wi)):
        if row and stride != 1:
            off = off * stride
        rel.append(torch.addcmul(r, visf, off.sub_(r)))

    # Segment bases: exclusive prefix sum of (extent + gap) over the segment ends of the row. At the
    # last token of a well-formed run the offsets are (t-1, (H-1)·α, (W-1)·α): the extent is their max.
    step = torch.maximum(rel[0], rel[1])
    torch.maximum(step, rel[2], out=step).add_(gap).mul_(_as_float(end, fdt))
    base = step.cumsum(1).sub_(step)

    # The one host sync: every check at once. A vision run is well formed iff its length r+1 at its
    # last token equals t·H·W of its grid; with vision_start_token_id every vision run follows one.
    bad = ((r + 1 != count) & end & vis).sum()
    if is_vs is not None:
        vs_ok = (start[:, 1:] & vis[:, 1:] & is_vs[:, :-1]).sum()   # counted against the run total
    else:
        vs_ok = n_img + n_vid
    checks = [n_img, n_vid, bad, vs_ok]
    if isinstance(bad_grid, torch.Tensor):
        checks.append(bad_grid)
    got = torch.stack(checks).tolist()
    if not isinstance(bad_grid, torch.Tensor):
        got.append(bad_grid)                                       # grids read on the host
    if got[0] != n_img_grid or got[1] != n_vid_grid or got[2] or got[3] != got[0] + got[1] or got[4]:
        _raise_index_error(got, n_img_grid, n_vid_grid, start, typ, r, end, vis, count, is_vs,
                           image_grid_thw, video_grid_thw, m, valid is not None)

    pos = torch.empty((3, B, S), dtype=torch.long, device=dev)
    for row in range(3):
        pos[row].copy_(rel[row].add_(base))
    if valid is None:
        deltas = (pos[:, :, -1].amax(0) + (1 - S)).unsqueeze(1)
    else:
        last = (lengths - 1).clamp_(min=0).view(1, B, 1).expand(3, B, 1)
        deltas = torch.where(lengths > 0, pos.gather(2, last).amax(0).squeeze(1) + 1 - lengths, 0).unsqueeze(1)
        pos = pos.gather(2, cidx.clamp(min=0).expand(3, B, S)).masked_fill_(~valid, pad_position)
    return pos, deltas


def _raise_index_error(got, n_img_grid, n_vid_grid, start, typ, r, end, vis, count, is_vs,
                       image_grid_thw, video_grid_thw, m, compacted):
    """Build the error message for a failed check (error path only: free to sync)."""
    where = " (counting unpadded tokens)" if compacted else ""
    for name, grid in (("image_grid_thw", image_grid_thw), ("video_grid_thw", video_grid_thw)):
        check_grid(name, None if grid is None else grid.long().cpu().numpy(), m)
    for kind, name, n_runs, n_grid in ((1, "image", got[0], n_img_grid), (2, "video", got[1], n_vid_grid)):
        if n_runs != n_grid:
            per_row = (start & (typ == kind)).sum(1).cpu()
            cum = per_row.cumsum(0)
            row = int((cum > n_grid).nonzero()[0]) if n_runs > n_grid else len(per_row) - 1
            raise ValueError(f"input_ids has {n_runs} {name} runs but {name}_grid_thw has {n_grid} rows; "
                             f"{name} runs per row: {per_row.tolist()}; the mismatch shows at row {row} "
                             f"({int(per_row[row])} {name} run(s) there)")
    bad_len = end & vis & (r + 1 != count)
    if bool(bad_len.any()):
        b, i = bad_len.nonzero()[0].tolist()
        kind = int(typ[b, i])
        name = "image" if kind == 1 else "video"
        grid = image_grid_thw if kind == 1 else video_grid_thw
        k = int((start & (typ == kind)).view(-1)[: b * typ.shape[1] + i + 1].sum()) - 1
        raise ValueError(f"row {b}: {name} run at token {i - int(r[b, i])}{where} has {int(r[b, i]) + 1} tokens but "
                         f"{name}_grid_thw[{k}] = {tuple(grid[k].tolist())} needs t·(h/{m})·(w/{m}) = "
                         f"{_tokens(grid[k].tolist(), m)} tokens")
    if is_vs is not None:
        prev_vs = F.pad(is_vs, (1, 0), value=False)[:, :-1]
        b, i = (start & vis & ~prev_vs).nonzero()[0].tolist()
        raise ValueError(f"row {b}: vision run at token {i}{where} does not follow vision_start_token_id")
    raise AssertionError("unreachable: a check failed without a message")  # pragma: no cover


