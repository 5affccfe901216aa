"""Argument checks of ``mcg_rope_index`` and ``mrope_decode_position_ids``, and the checks and error
messages of the grids and time intervals both implementations share.

* ``check_inputs``, ``interval_tensor``, ``check_decode``: shapes, dtypes, devices and the scalar
  arguments, before any work.
* ``check_grid``, ``check_interval``, ``check_time_offsets``: the values of the grids and intervals as
  host (NumPy) arrays; ``grid_count``, ``grid_name``, ``grid_tokens``: the words of the errors that
  compare token runs with grid rows. The NumPy path (``cpu.py``) calls them on its arrays, the device
  path (``device.py``) on the error path only, after its one host sync.

Every error names the argument, what was expected and what was given.
"""

from __future__ import annotations

import numpy as np
import torch

from .._validation import check_int, check_nonnegative_float, check_shape, check_tensor

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
INTERVAL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_inputs(
    input_ids,
    image_grid_thw,
    video_grid_thw,
    attention_mask,
    image_token_id,
    video_token_id,
    vision_start_token_id,
    spatial_merge_size,
    modality_gap,
    vision_stride,
    pad_position,
    video_time_interval,
    split_video_frames,
) -> torch.Tensor | None:
    """``mcg_rope_index``' arguments, before any work: input_ids int [B, S] (S >= 1), grids int [n, 3]
    on the CPU or input_ids' device, attention_mask [B, S] on input_ids' device (no tensor on the meta
    device), the ids and sizes, and positions that stay below 2^53.
    Returns ``video_time_interval`` as float32 [N_vid] (``interval_tensor``) or None. The values of the
    grids and intervals are checked by the implementations (they need the token runs).
    """
    check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int64, torch.int32))
    S = input_ids.shape[1]
    if S == 0:
        raise ValueError(f"input_ids must have at least one column, got shape {list(input_ids.shape)}")
    for name, grid in (("image_grid_thw", image_grid_thw), ("video_grid_thw", video_grid_thw)):
        if grid is not None:
            check_tensor(name, grid, ndim=2, dtypes=INT_DTYPES)
            check_shape(name, grid, (None, 3))
            if grid.device.type != "cpu" and grid.device != input_ids.device:
                raise ValueError(
                    f"{name} is on {grid.device} but input_ids is on {input_ids.device}; a grid lives on "
                    "the CPU or on input_ids' device"
                )
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=2, dtypes=INT_DTYPES + (torch.bool,))
        check_shape("attention_mask", attention_mask, tuple(input_ids.shape))
        if attention_mask.device != input_ids.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but input_ids is on {input_ids.device}")
    ints = (image_token_id, video_token_id, spatial_merge_size, modality_gap, vision_stride, pad_position)
    if not all(type(v) is int for v in ints) or min(spatial_merge_size, modality_gap, vision_stride) < 1:
        check_int("image_token_id", image_token_id)  # the slow path, for the error message
        check_int("video_token_id", video_token_id)
        check_int("spatial_merge_size", spatial_merge_size, low=1)
        check_int("modality_gap", modality_gap, low=1)
        check_int("vision_stride", vision_stride, low=1)
        check_int("pad_position", pad_position)
    # Bases and spatial positions grow by at most gap + stride per token; the device path computes them in
    # float64, exact below 2^53 (and int64 holds them). Temporal offsets are checked below 2^53 apart
    # (by the implementations: they need the grids), so every position stays below 2^54.
    if S * (modality_gap + vision_stride) >= 2**53:
        raise ValueError(
            f"modality_gap={modality_gap} and vision_stride={vision_stride} over {S} tokens give "
            "positions beyond 2^53: S·(modality_gap + vision_stride) must be < 2^53"
        )
    if image_token_id == video_token_id:
        raise ValueError(f"image_token_id and video_token_id must differ, both are {image_token_id}")
    if vision_start_token_id is not None:
        check_int("vision_start_token_id", vision_start_token_id)
        if vision_start_token_id in (image_token_id, video_token_id):
            raise ValueError(f"vision_start_token_id={vision_start_token_id} equals a placeholder id")
    if type(split_video_frames) is not bool:
        raise TypeError(f"split_video_frames must be a bool, got {type(split_video_frames).__name__}")
    interval = interval_tensor(
        video_time_interval, 0 if video_grid_thw is None else video_grid_thw.shape[0], split_video_frames
    )
    if interval is not None and interval.device.type != "cpu" and interval.device != input_ids.device:
        raise ValueError(f"video_time_interval is on {interval.device} but input_ids is on {input_ids.device}")
    return interval


def interval_tensor(value, n_videos: int, split_video_frames: bool) -> torch.Tensor | None:
    """``video_time_interval`` as float32 [n_videos] (a float is every video's), or None.

    A tensor keeps its device; its values (finite, >= 0) are checked by the implementations, on the
    host or inside the device path's one sync. float64 values are rounded to float32, the precision
    stock computes in (``torch.arange(t) * interval`` of a float32 interval).
    """
    if value is None:
        return None
    if split_video_frames:
        raise ValueError(
            "video_time_interval with split_video_frames=True: no Qwen-VL family spaces split "
            "frames by a time interval (Qwen2.5-VL: interval, one run per video; Qwen3-VL: split "
            "frames, interval 1)"
        )
    if not isinstance(value, torch.Tensor):
        value = check_nonnegative_float("video_time_interval", value)
        return torch.full((n_videos,), value, dtype=torch.float32)
    check_tensor("video_time_interval", value, ndim=1, dtypes=INTERVAL_DTYPES)
    if value.shape[0] != n_videos:
        raise ValueError(
            f"video_time_interval has {value.shape[0]} values but video_grid_thw has {n_videos} rows "
            "(one time interval per video grid row)"
        )
    return value.detach().to(torch.float32)


def check_decode(cache_position, rope_deltas, num_tokens) -> None:
    """``mrope_decode_position_ids``' arguments: rope_deltas int [B, 1] (or [B]); cache_position an int >= 0
    with num_tokens >= 1, or an int tensor [S_new] or [B, S_new]."""
    check_tensor("rope_deltas", rope_deltas, ndim=(1, 2), dtypes=INT_DTYPES)
    if rope_deltas.dim() == 2:
        check_shape("rope_deltas", rope_deltas, (None, 1))
    if isinstance(cache_position, torch.Tensor):
        check_tensor("cache_position", cache_position, ndim=(1, 2), dtypes=INT_DTYPES)
        if cache_position.dim() == 2:
            check_shape("cache_position", cache_position, (rope_deltas.shape[0], None))
    else:
        check_int("cache_position", cache_position, low=0)
        check_int("num_tokens", num_tokens, low=1)


def check_grid(name: str, grid: np.ndarray | None, m: int) -> None:
    """t ≥ 1 and h, w positive multiples of the merge size, else ValueError naming the grid row."""
    if grid is None or grid.shape[0] == 0:
        return
    if grid.min() >= 1 and not (grid[:, 1:] % m).any():  # h, w ≥ 1 and multiples of m → ≥ m
        return
    bad = (grid < 1).any(1) | (grid[:, 1:] % m != 0).any(1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name}[{i}] = {tuple(grid[i].tolist())}: t must be >= 1 and h, w positive "
            f"multiples of spatial_merge_size={m}"
        )


def grid_tokens(grid_row, m: int) -> int:
    """t·(h/m)·(w/m) of one grid row (t, h, w), exactly (Python ints): for error messages."""
    t, h, w = (int(v) for v in grid_row)
    return t * (h // m) * (w // m)


def grid_count(name: str, n_grid: int, frames) -> str:
    """'video_grid_thw has 3 rows', or with split frames how many frames they hold."""
    if frames:
        return (
            f"{name}_grid_thw has {len(frames[0])} rows of {n_grid} frames in all (split_video_frames: "
            "one video run per frame)"
        )
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
        raise ValueError(f"video_time_interval[{i}] = {float(interval[i]):.8g}: time intervals must be finite and >= 0")


def check_time_offsets(t_top: np.ndarray, t: np.ndarray, interval: np.ndarray) -> None:
    """The last frame's temporal offset float32(t − 1)·interval of every video below 2^53 (positions stay
    exact in int64 and the device path's float64), else ValueError naming the video."""
    bad = t_top >= 2.0**53
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"video_time_interval[{i}] = {float(interval[i]):.8g} puts frame {int(t[i]) - 1} of "
            f"video_grid_thw[{i}] at temporal offset {float(t_top[i]):.4g}, beyond 2^53"
        )
