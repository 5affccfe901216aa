"""3-D position ids inside transformers: MCG-RoPE indices, and complete vision runs on every path.

Everything in transformers that needs 3-D (t, h, w) positions goes through ``get_rope_index``:
the model's forward (``compute_3d_position_ids``, which also caches ``rope_deltas`` for decoding
with a KV cache) and ``generate()`` (``_prepare_position_ids_for_generation``, whose prompt
positions are then continued by +1 per new token). Replacing this one method makes training,
prefill and decoding use the same indices:

    position_ids [3,B,S], rope_deltas [B,1] = mcg_rope_index(input_ids, grids, attention_mask,
                                                             modality_gap=λ, vision_stride=α)

λ = α = 1 is each family's stock M-RoPE (images and videos: Qwen2.5-VL's timed video positions and
Qwen3-VL's per-frame grids included); the ClinKD paper's released setting is λ = 2, α = 1.
Padding positions get 0, as transformers writes them.

Both callers of ``get_rope_index`` call it only when ``mm_token_type_ids`` [B,S] (0 text, 1 image,
2 video) is given. Without it ``generate()`` hands the language model 1-D text positions for every
token, image placeholders included, and Qwen2.5-VL's forward does the same — silently wrong for any
model trained with 3-D positions. So every patched model also wraps both callers: a missing
``mm_token_type_ids`` is derived from ``input_ids`` (the image/video placeholder ids, padding 0),
a given one must agree with it (checked once per ``generate()``, and in every forward of a model with
stock indices, whose positions the types decide; MCG-RoPE indices read the ids, not the types), and
multimodal inputs without ``input_ids`` (``inputs_embeds`` alone) need explicit ``position_ids``. With
``mm_token_type_ids`` given and consistent, the stock
callers run unchanged.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from clinkd_kernels import mcg_rope_index

from ._compat import index_conventions, video_seconds_truncated


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
    raise TypeError(
        f"mcg_rope must be an MCGRope, a dict with modality_gap/vision_stride, True or None; got {type(value).__name__}"
    )


def _video_time_interval(
    second_per_grid_ts, video_grid_thw: torch.Tensor, tokens_per_second, *, whole_seconds: bool = False
) -> torch.Tensor:
    """fp32 [N_vid]: Qwen2.5-VL's temporal step per frame grid, ``tokens_per_second · second_per_grid_ts[i]``
    (1 second per grid when none is given), multiplied as the stock ``get_rope_index`` multiplies it (an int
    times each element, a 0-d tensor or a float), so the fp32 step is the stock one to the bit.
    whole_seconds: the installed transformers truncates each ``second_per_grid_ts`` to an integer first
    (``_compat.video_seconds_truncated``), as releases before 5.18 do."""
    n = video_grid_thw.shape[0]
    seconds = [1] * n if second_per_grid_ts is None else list(second_per_grid_ts)
    if len(seconds) < n:
        raise ValueError(f"second_per_grid_ts has {len(seconds)} entries for {n} videos (video_grid_thw rows)")
    if whole_seconds:
        seconds = [int(s) for s in seconds]
    steps = [tokens_per_second * s for s in seconds[:n]]
    return torch.stack([torch.as_tensor(x).float().reshape(()) for x in steps]).to(video_grid_thw.device)


def make_get_rope_index(original, settings: MCGRope, *, family):
    """A ``get_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, ...,
    attention_mask, **kwargs) -> (position_ids [3,B,S], rope_deltas [B,1])`` computing MCG-RoPE indices
    by the rule of ``family`` (``_compat.Family.video``: Qwen2.5-VL's timed video positions from
    ``second_per_grid_ts``, Qwen3-VL's one grid per frame). ``original`` is the stock function (its
    signature is kept, so callers may pass any of its arguments); the conventions of the installed
    release (``_compat.IndexConventions``: padding value, what rope_deltas count) are read from it."""
    signature = inspect.signature(original)
    whole_seconds = family.video == "timed" and video_seconds_truncated(original)
    conventions = index_conventions(family.cls("Model"))

    @functools.wraps(original)
    def get_rope_index(self, *args, **kwargs):
        arguments = _bind(signature, (self, *args), kwargs)
        input_ids = arguments["input_ids"]
        image_grid_thw = arguments.get("image_grid_thw")
        video_grid_thw = arguments.get("video_grid_thw")
        attention_mask = arguments.get("attention_mask")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.is_floating_point():
            attention_mask = attention_mask != 0  # stock takes float masks (LLaMA-Factory's collator passes one)
        config = self.config
        video = {}
        if family.video == "timed" and video_grid_thw is not None:
            video["video_time_interval"] = _video_time_interval(
                arguments.get("second_per_grid_ts"),
                video_grid_thw,
                config.vision_config.tokens_per_second,
                whole_seconds=whole_seconds,
            )
        elif family.video == "split":
            video["split_video_frames"] = True
        merge = config.vision_config.spatial_merge_size
        if conventions.restart_after_last_frame and video_grid_thw is not None and family.video != "split":
            _check_restart_rule_agrees(video_grid_thw, video.get("video_time_interval"), merge, settings)
        positions, deltas = mcg_rope_index(
            input_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=attention_mask,
            image_token_id=config.image_token_id,
            video_token_id=config.video_token_id,
            spatial_merge_size=merge,
            modality_gap=settings.modality_gap,
            vision_stride=settings.vision_stride,
            pad_position=conventions.pad_position,
            **video,
        )
        if conventions.deltas_over_padded_length:
            tokens = input_ids.shape[1] if attention_mask is None else (attention_mask != 0).sum(1, keepdim=True)
            deltas = deltas + tokens - input_ids.shape[1]
        return positions, deltas

    return get_rope_index


def _check_restart_rule_agrees(video_grid_thw: torch.Tensor, interval, merge: int, settings: MCGRope) -> None:
    """transformers < 5.3 starts the segment after a video at its largest position, the last frame's
    temporal one included; clinkd's index (and 5.3+) at its largest spatial position. The two agree
    unless a video's last temporal offset exceeds its spatial extent: refuse that video there."""
    for i, (t, h, w) in enumerate(video_grid_thw.tolist()):
        last_frame = (t - 1) if interval is None else int(float(interval[i]) * (t - 1))
        spatial = (max(h, w) // merge - 1) * settings.vision_stride
        if last_frame > spatial:
            import transformers

            raise ValueError(
                f"video {i} (grid {t}x{h}x{w}): transformers {transformers.__version__} positions the "
                f"text after it from its last frame ({last_frame}), clinkd's index from its largest "
                f"spatial position ({spatial}), as transformers 5.3+ does; upgrade transformers to "
                ">=5.3 for videos with more frames than their spatial extent"
            )


# --------------------------------------------------------------------------------------------------
# mm_token_type_ids: derived from input_ids where missing, checked where given


def _has_vision(arguments: dict) -> bool:
    return arguments.get("image_grid_thw") is not None or arguments.get("video_grid_thw") is not None


def complete_token_types(
    input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, config
) -> torch.Tensor:
    """``mm_token_type_ids`` [B,S] for ``input_ids`` [B,S]: 1 on image placeholders, 2 on video
    placeholders, 0 elsewhere (padding included). A given one is returned as it is if it agrees with
    that on every unpadded token; ValueError otherwise (the runs transformers would position differ
    from the placeholders the vision features are scattered into)."""
    derived = (input_ids == config.image_token_id).long() + 2 * (input_ids == config.video_token_id).long()
    keep = None  # a decoding step's mask also covers the cached tokens: then every token counts
    if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == input_ids.shape:
        keep = attention_mask.to(input_ids.device) != 0
        derived = derived.masked_fill(~keep, 0)
    if mm_token_type_ids is None:
        return derived.to(torch.int32)
    if not isinstance(mm_token_type_ids, torch.Tensor) or mm_token_type_ids.shape != input_ids.shape:
        shape = (
            list(mm_token_type_ids.shape) if isinstance(mm_token_type_ids, torch.Tensor) else type(mm_token_type_ids)
        )
        raise ValueError(
            f"mm_token_type_ids must be a tensor of the shape of input_ids {list(input_ids.shape)}, got {shape}"
        )
    wrong = mm_token_type_ids.to(derived.device).long() != derived
    if keep is not None:
        wrong &= keep
    if bool(wrong.any()):
        b, s = (int(i) for i in wrong.nonzero()[0])
        raise ValueError(
            f"mm_token_type_ids disagrees with input_ids at row {b}, token {s}: it says "
            f"{int(mm_token_type_ids[b, s])}, the token id {int(input_ids[b, s])} means {int(derived[b, s])} "
            f"(1 = image_token_id {config.image_token_id}, 2 = video_token_id "
            f"{config.video_token_id}, 0 = anything else); pass matching ids or leave it out"
        )
    return mm_token_type_ids


def _bind(signature: inspect.Signature, args, kwargs) -> dict:
    """Arguments by name (``self`` included), with a ``**kwargs`` parameter folded in."""
    arguments = dict(signature.bind(*args, **kwargs).arguments)
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            arguments.update(arguments.pop(param.name, {}))
    return arguments


def make_compute_3d_position_ids(call, wrapped, *, types_decide: bool = True):
    """``<P>Model.compute_3d_position_ids(input_ids, inputs_embeds, image_grid_thw, ..., mm_token_type_ids)``
    that completes ``mm_token_type_ids`` from ``input_ids`` before the stock logic runs.

    types_decide: the model's ``get_rope_index`` reads the types (stock indices). With MCG-RoPE indices
    it reads the placeholder ids instead, so given types cannot move a position and are passed on
    unchecked: no host sync per training step for a check that cannot change the result."""
    signature = inspect.signature(wrapped)

    @functools.wraps(wrapped)
    def compute_3d_position_ids(self, *args, **kwargs):
        arguments = _bind(signature, (self, *args), kwargs)
        arguments.pop("self")
        if _has_vision(arguments):
            input_ids, given = arguments.get("input_ids"), arguments.get("mm_token_type_ids")
            if input_ids is not None and (given is None or types_decide):
                arguments["mm_token_type_ids"] = complete_token_types(
                    input_ids, given, arguments.get("attention_mask"), self.config
                )
            elif input_ids is None and (self.rope_deltas is None or _cache_length(arguments) == 0):
                raise ValueError(
                    "image_grid_thw/video_grid_thw were passed with inputs_embeds but without input_ids: "
                    "the 3-D positions of the vision tokens cannot be found; pass input_ids, or "
                    "position_ids [3,B,S] (e.g. from clinkd_kernels.mcg_rope_index)"
                )
        return call(self, **arguments)

    return compute_3d_position_ids


def _cache_length(arguments: dict) -> int:
    cache = arguments.get("cache", arguments.get("past_key_values"))
    return 0 if cache is None else int(cache.get_seq_length())


def make_prepare_position_ids_for_generation(call, wrapped):
    """``<P>ForConditionalGeneration._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)``
    (called once by ``generate()``, before beam/num_return_sequences expansion) that completes
    ``model_kwargs["mm_token_type_ids"]`` from the prompt's ids, so the stock logic computes 3-D
    positions and every later step receives the types, exactly as with a processor's output."""

    @functools.wraps(wrapped)
    def prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        if _has_vision(model_kwargs):
            input_ids = model_kwargs.get("input_ids")
            if input_ids is None or input_ids.shape[1] == 0:
                input_ids = inputs_tensor
            if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    "generate() got image_grid_thw/video_grid_thw with inputs_embeds but without "
                    "input_ids: the 3-D positions of the vision tokens cannot be found; pass "
                    "input_ids too, or position_ids [3,B,S]"
                )
            model_kwargs["mm_token_type_ids"] = complete_token_types(
                input_ids, model_kwargs.get("mm_token_type_ids"), model_kwargs.get("attention_mask"), self.config
            )
        return call(self, inputs_tensor, model_kwargs)

    return prepare_position_ids_for_generation
