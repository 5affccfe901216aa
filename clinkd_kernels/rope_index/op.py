"""MCG-RoPE position indices: the public functions and the custom op (the argument checks are ``checks.py``'s).

    mcg_rope_index(input_ids [B,S], ...)        → position_ids [3,B,S] (rows t, h, w), rope_deltas [B,1]
    mrope_decode_position_ids(cache_position, rope_deltas [B,1]) → position_ids [3,B,S_new]

The unpadded tokens of a row are segments: text runs, and vision runs (the consecutive placeholder
tokens of one image/video, t·(h/m)·(w/m) of them, m = spatial_merge_size). With r the index of a
token inside its segment and b the segment's base:

    text token   → (b + r, b + r, b + r)
    vision token → (b + T(ti), b + hi·α, b + wi·α),   r = (ti·H + hi)·W + wi,  H = h/m, W = w/m
    b_0 = 0
    after a text run of n tokens:  b_{s+1} = b_s + (n − 1) + λ                (its last position + λ)
    after a vision run:            b_{s+1} = b_s + (max(H, W) − 1)·α + λ      (its largest spatial position + λ)
    T(ti) = ti; for a video with a time interval (Qwen2.5-VL) T(ti) = int(float32(ti)·float32(interval))
    rope_deltas = largest position of the row (any of t, h, w) + 1 − number of unpadded tokens

λ = modality_gap, α = vision_stride; at λ = α = 1 this is transformers 5.x's ``get_rope_index`` of
all three Qwen-VL families: the segment after a vision run starts at base + max(h, w)/m whatever
the number of frames (transformers 4.x restarted after a video's largest position, its last frame:
that differs where a video's last temporal position exceeds its spatial extent). So a video's
temporal positions may run past the segments after it; rope_deltas counts them (the max is over all
positions). Rows are independent. The families differ in how videos are laid out:

* Qwen2-VL: one run per video, frame ti at temporal position b + ti (no time interval).
* Qwen2.5-VL: as Qwen2-VL, temporal positions spaced by ``video_time_interval`` (stock:
  tokens_per_second · second_per_grid_ts[i]); images always use interval 1; α does not apply to t.
* Qwen3-VL: ``split_video_frames``: each frame is its own run (timestamp text and vision_end /
  vision_start tokens between frames), so a grid row (t, h, w) counts as t rows (1, h, w).

Two vectorised implementations, chosen by device: CPU tensors go to NumPy on the host (``cpu.py``:
per-op overhead is what costs at these sizes, and NumPy's is lower); CUDA tensors stay on the
device (``device.py``: tensor ops, one host sync for the checks). The per-row loop in
``reference.py`` is the spec both are tested against.
"""

from __future__ import annotations

import numpy as np
import torch

from .checks import check_decode, check_inputs
from .cpu import mcg_rope_index_cpu
from .device import mcg_rope_index_device


def _host_array(x: torch.Tensor | None) -> np.ndarray | None:
    return None if x is None else x.detach().cpu().numpy().astype(np.int64, copy=False)


def mcg_rope_index_impl(
    input_ids,
    image_grid_thw,
    video_grid_thw,
    attention_mask,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int | None,
    spatial_merge_size: int,
    modality_gap: int,
    vision_stride: int,
    pad_position: int,
    video_time_interval: torch.Tensor | None = None,
    split_video_frames: bool = False,
):
    """Dispatch by device: CPU → NumPy host path, otherwise the on-device tensor path."""
    if input_ids.device.type == "cpu":
        mask = None if attention_mask is None else attention_mask.numpy() != 0
        interval = None if video_time_interval is None else video_time_interval.cpu().numpy()
        pos, deltas = mcg_rope_index_cpu(
            input_ids.numpy(),
            _host_array(image_grid_thw),
            _host_array(video_grid_thw),
            mask,
            image_token_id,
            video_token_id,
            vision_start_token_id,
            spatial_merge_size,
            modality_gap,
            vision_stride,
            pad_position,
            interval,
            split_video_frames,
        )
        return torch.from_numpy(pos), torch.from_numpy(deltas)
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


# ---------------------------------------------------------------------------------------------------
# Public op


@torch.library.custom_op("clinkd::mcg_rope_index", mutates_args=())
def _mcg_rope_index_op(
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
    video_time_interval: torch.Tensor | None,
    split_video_frames: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op torch.compile sees: (position_ids [3,B,S], rope_deltas [B,1]) int64; inputs validated."""
    return mcg_rope_index_impl(
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


@_mcg_rope_index_op.register_fake
def _(
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
):
    B, S = input_ids.shape
    return (input_ids.new_empty((3, B, S), dtype=torch.long), input_ids.new_empty((B, 1), dtype=torch.long))


def mcg_rope_index(
    input_ids: torch.Tensor,
    *,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int | None = None,
    spatial_merge_size: int = 2,
    modality_gap: int = 2,
    vision_stride: int = 1,
    pad_position: int = 1,
    video_time_interval: float | torch.Tensor | None = None,
    split_video_frames: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MCG-RoPE 3-D position ids for a batch of multimodal token sequences (rules: module docstring).

    Args:
        input_ids: [B, S] int64/int32 token ids.
        image_grid_thw: [N_img, 3] (t, h, w) patch grids of the images, in batch order (as the
            Qwen2-VL processor returns them); h, w before the m×m merge.
        video_grid_thw: [N_vid, 3] likewise for videos (t frames after temporal patching).
        attention_mask: [B, S], nonzero = token, 0 = padding (left, right or anywhere).
        image_token_id, video_token_id: placeholder ids; a run of consecutive placeholders is one
            image/video.
        vision_start_token_id: if given, every vision run must follow this token (ValueError if not).
        spatial_merge_size: m; a run has t·(h/m)·(w/m) tokens.
        modality_gap: λ ≥ 1; a segment starts λ after the previous one's last text position or
            largest spatial position. 1 = stock Qwen-VL, 2 = ClinKD's released setting.
        vision_stride: α ≥ 1; spacing of the h and w positions inside a vision run (not of t).
        pad_position: value written at padding positions (default 1; transformers 5.x writes 0).
        video_time_interval: None (interval 1: Qwen2-VL, Qwen3-VL), a float ≥ 0 (every video's), or a
            float tensor [N_vid] (one per video_grid_thw row, in order; CPU or input_ids' device):
            frame ti of a video at base b gets temporal position b + int(float32(ti)·float32(interval)),
            as Qwen2.5-VL with interval = tokens_per_second · second_per_grid_ts[i]. Images: interval 1.
        split_video_frames: each video_grid_thw row (t, h, w) feeds t video runs (1, h, w), one per
            frame, as Qwen3-VL lays videos out (timestamp text between frames). Not with an interval.

    Returns:
        position_ids [3, B, S] int64 (rows t, h, w) and rope_deltas [B, 1] int64
        (largest position + 1 − number of unpadded tokens; 0 for a row without tokens).

    Raises ValueError naming the row and counts when runs and grids disagree, when a grid's h/w is
    not a multiple of ``spatial_merge_size``, or when ``video_time_interval`` has the wrong length, a
    value that is not finite and ≥ 0, or puts a last frame at 2^53 or beyond. Rows are independent
    (any batch size).
    """
    interval = check_inputs(
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
    if input_ids.device.type == "cpu":
        input_ids = input_ids.contiguous()
        if attention_mask is not None:
            attention_mask = attention_mask.contiguous()
    B, S = input_ids.shape
    if B == 0:
        return input_ids.new_zeros((3, 0, S), dtype=torch.long), input_ids.new_zeros((0, 1), dtype=torch.long)
    # The custom op is what torch.compile sees; eager calls skip its dispatch, a cost of the order of the
    # op itself at these sizes.
    call = _mcg_rope_index_op if torch.compiler.is_compiling() else mcg_rope_index_impl
    return call(
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
        interval,
        split_video_frames,
    )


def mrope_decode_position_ids(cache_position, rope_deltas: torch.Tensor, *, num_tokens: int = 1) -> torch.Tensor:
    """Position ids for tokens appended after a prefill, as transformers' Qwen2-VL does while decoding.

        position_ids[:, b, i] = cache_position[i] + rope_deltas[b]      (same value on rows t, h, w)

    Args:
        cache_position: an int (the index of the first new token; ``num_tokens`` consecutive tokens
            follow), or an integer tensor [S_new] (shared by the batch) or [B, S_new].
        rope_deltas: [B, 1] (or [B]) from ``mcg_rope_index``.
    Returns:
        position_ids [3, B, S_new] int64 on rope_deltas' device.

    Note: a shared cache_position counts padded slots, so with it a left-padded row's new tokens sit
    n_pad beyond its largest prefill position + 1. transformers' ``generate()`` continues every row at
    its own last position + 1 (its text positions come from the attention mask); to match it, pass
    per-row positions ``cache_position [B, S_new]`` = the row's unpadded token count + i.
    """
    check_decode(cache_position, rope_deltas, num_tokens)
    B = rope_deltas.shape[0]
    deltas = rope_deltas.reshape(B, 1).long()
    if isinstance(cache_position, torch.Tensor):
        pos = cache_position.to(device=deltas.device, dtype=torch.long)
    else:
        pos = torch.arange(cache_position, cache_position + num_tokens, device=deltas.device)
    pos = pos.expand(B, -1) + deltas
    return pos.unsqueeze(0).expand(3, -1, -1).contiguous()
