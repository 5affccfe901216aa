"""The implementations of ``mcg_rope_index`` the index tests run side by side: the public op (the NumPy
path on CPU tensors), the on-device path run on CPU tensors, and the on-device path with its grids and
intervals handled as device tensors."""

from __future__ import annotations

import torch

from clinkd_kernels.rope_index import device, mcg_rope_index
from clinkd_kernels.rope_index.device import mcg_rope_index_device


def device_path(
    input_ids,
    *,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    image_token_id,
    video_token_id,
    vision_start_token_id=None,
    spatial_merge_size=2,
    modality_gap=2,
    vision_stride=1,
    pad_position=1,
    video_time_interval=None,
    split_video_frames=False,
):
    """The on-device (CUDA) implementation, run here on CPU tensors (a float interval made a tensor, as
    the public op does)."""
    if video_time_interval is not None and not isinstance(video_time_interval, torch.Tensor):
        n = 0 if video_grid_thw is None else video_grid_thw.shape[0]
        video_time_interval = torch.full((n,), video_time_interval, dtype=torch.float32)
    return mcg_rope_index_device(
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
    )


def device_grids_path(input_ids, **kw):
    """The device path with grids and intervals handled as device tensors (as CUDA ones are), on CPU."""
    device.READ_CPU_GRIDS = False
    try:
        return device_path(input_ids, **kw)
    finally:
        device.READ_CPU_GRIDS = True


IMPLS = {"host": mcg_rope_index, "device": device_path}
ALL_IMPLS = dict(IMPLS, device_grids=device_grids_path)
