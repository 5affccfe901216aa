"""MCG-RoPE position ids inside transformers: a replacement for ``<P>Model.get_rope_index``.

Everything in transformers that needs 3-D (t, h, w) positions goes through ``get_rope_index``:
the model's forward (``compute_3d_position_ids``, which also caches ``rope_deltas`` for decoding
with a KV cache) and ``generate()`` (``_prepare_position_ids_for_generation``, whose prompt
positions are then continued by +1 per new token). Replacing this one method makes training,
prefill and decoding use the same indices:

    position_ids [3,B,S], rope_deltas [B,1] = mcg_rope_index(input_ids, grids, attention_mask,
                                                             modality_gap=λ, vision_stride=α)

λ = α = 1 is stock Qwen2-VL M-RoPE for images; the ClinKD paper's released setting is λ = 2, α = 1.
Vision runs are found from the placeholder token ids (``mm_token_type_ids`` is accepted but not
needed). Padding positions get 0, as transformers writes them.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

from clinkd_kernels.rope import mcg_rope_index


@dataclass(frozen=True)
class MCGRope:
    """MCG-RoPE index settings: ``modality_gap`` λ ≥ 1 between modality segments, ``vision_stride`` α ≥ 1
    between neighbouring h/w positions inside an image. Defaults: the paper's released λ = 2, α = 1."""

    modality_gap: int = 2
    vision_stride: int = 1

    def __post_init__(self):
        for name in ("modality_gap", "vision_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MCGRope.{name} must be an int >= 1, got {value!r}")


def as_mcg_rope(value) -> MCGRope | None:
    """Normalise the ``mcg_rope=`` argument: MCGRope, a dict of its fields, True (defaults) or None."""
    if value is None or value is False:
        return None
    if value is True:
        return MCGRope()
    if isinstance(value, MCGRope):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {"modality_gap", "vision_stride"}
        if unknown:
            raise ValueError(f"mcg_rope accepts the keys modality_gap and vision_stride, got {sorted(unknown)}")
        return MCGRope(**value)
    raise TypeError(f"mcg_rope must be an MCGRope, a dict with modality_gap/vision_stride, True or None; "
                    f"got {type(value).__name__}")


def make_get_rope_index(original, settings: MCGRope, *, timed_video: bool, family_name: str):
    """A ``get_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, ...,
    attention_mask, **kwargs) -> (position_ids [3,B,S], rope_deltas [B,1])`` computing MCG-RoPE indices.
    ``original`` is the stock function (its signature is kept, so callers may pass any of its arguments)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_rope_index(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        input_ids = arguments["input_ids"]
        image_grid_thw = arguments.get("image_grid_thw")
        video_grid_thw = arguments.get("video_grid_thw")
        if timed_video and video_grid_thw is not None:
            raise ValueError(f"MCG-RoPE indices for {family_name} videos are not supported (their temporal "
                             "positions are spaced by frame timing); patch with mcg_rope=None for video inputs")
        config = self.config
        return mcg_rope_index(
            input_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            attention_mask=arguments.get("attention_mask"), image_token_id=config.image_token_id,
            video_token_id=config.video_token_id, spatial_merge_size=config.vision_config.spatial_merge_size,
            modality_gap=settings.modality_gap, vision_stride=settings.vision_stride, pad_position=0)

    return get_rope_index
