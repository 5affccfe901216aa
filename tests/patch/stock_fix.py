"""The stock models of transformers 5.3-5.5 with the upstream fix of their vision positions applied,
so the patch tests have a correct stock to be equal to there.

Those releases introduced ``<P>Model.get_vision_position_ids`` and got it wrong for every grid of more
than one frame: the temporal axis is ``start · time_interval`` for every token and the row index
advances once per ``w · t`` tokens instead of once per ``w`` (transformers 5.6 rewrote it). Qwen2.5-VL
5.3-5.4 also spaces images by ``tokens_per_second`` (harmless once the frame index is right: an image
has one frame) and takes a ``second_per_grid_ts`` entry for each image too, so a video after an image
reads another video's seconds (5.5 fixed it); Qwen3-VL 5.3 forgot to split a video grid into its frames
(5.4 split it again).

clinkd computes the positions of every other release there (the rule the Qwen models were trained
with). So that "gap 1 = stock" stays a test on those releases, the stock model a test compares with gets,
on its own instance and only where the installed method is found wrong by a probe:

* ``get_vision_position_ids`` by the rule of 5.6+, written out below
  (``test_the_fixed_vision_positions_are_stock_where_stock_is_right`` holds it to stock on 5.6+);
* around the stock ``get_rope_index``: for Qwen3-VL without the split, the split; for Qwen2.5-VL taking
  seconds for images, a placeholder second for each image.

Everything else of the stock model (its ``get_rope_index`` loop, decoding, attention, loss) is untouched.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch

PROBE = dict(
    start_position=5, grid_thw=torch.tensor([2, 2, 3]), temp_merge_size=1, spatial_merge_size=1, time_interval=3
)


def vision_positions(
    self, start_position, grid_thw, temp_merge_size=1, spatial_merge_size=1, time_interval=1, device=None
) -> torch.Tensor:
    """[3, t·h·w] (frame, row, column) positions of one merged grid, frames spaced by ``time_interval``,
    the whole offset by ``start_position``; tokens in (frame, row, column) order."""
    t = int(grid_thw[0]) // temp_merge_size
    h = int(grid_thw[1]) // spatial_merge_size
    w = int(grid_thw[2]) // spatial_merge_size
    frame = (torch.arange(t, device=device) * time_interval).repeat_interleave(h * w)
    row = torch.arange(h, device=device).repeat_interleave(w).repeat(t)
    column = torch.arange(w, device=device).repeat(h * t)
    return torch.stack([frame, row, column]) + start_position


def vision_positions_wrong(model_cls: type) -> bool:
    """Whether the installed ``get_vision_position_ids`` of a ``<P>Model`` class differs from the rule on a
    two-frame probe grid (transformers 5.3-5.5). False where the class has none (before 5.3)."""
    stock = getattr(model_cls, "get_vision_position_ids", None)
    return stock is not None and not torch.equal(stock(None, **PROBE), vision_positions(None, **PROBE))


def video_grids_unsplit(model_cls: type) -> bool:
    """Whether a Qwen3-VL ``get_rope_index`` reads the per-frame runs without splitting ``video_grid_thw``
    into one grid per frame (transformers 5.3)."""
    return "Qwen3VL" in model_cls.__name__ and "repeat_interleave(video_grid_thw" not in _source(model_cls)


def seconds_taken_by_images(model_cls: type) -> bool:
    """Whether a Qwen2.5-VL ``get_rope_index`` takes the next ``second_per_grid_ts`` entry for every image
    too, so a video after an image reads another video's seconds (transformers 5.3-5.4)."""
    source = _source(model_cls)
    return "int(next(second_per_grid_ts))" in source and "modality_type == 2" not in source


def with_fixed_vision_positions(model):
    """``model`` (a ``*ForConditionalGeneration``) with the fixes above on its ``<P>Model`` instance, where
    the installed release needs them; returned as is elsewhere."""
    inner = model.model
    cls = type(inner)
    if vision_positions_wrong(cls):
        inner.get_vision_position_ids = types.MethodType(vision_positions, inner)
    fixes = [
        fix
        for needed, fix in (
            (video_grids_unsplit(cls), _split_video_grids),
            (seconds_taken_by_images(cls), _seconds_for_every_vision_run),
        )
        if needed
    ]
    if fixes:
        inner.get_rope_index = types.MethodType(_fixed_arguments(cls.get_rope_index, fixes), inner)
    return model


def _source(model_cls: type) -> str:
    return inspect.getsource(inspect.unwrap(model_cls.get_rope_index))


def _fixed_arguments(stock, fixes):
    """The stock ``get_rope_index`` called with its arguments rewritten by each of ``fixes``
    (``fix(arguments: dict) -> None``). A class-level clinkd patch installed later keeps precedence (it
    takes the arguments as every other release passes them)."""
    signature = inspect.signature(stock)

    @functools.wraps(stock)
    def get_rope_index(self, *args, **kwargs):
        current = type(self).get_rope_index
        if current is not stock:
            return current(self, *args, **kwargs)
        arguments = dict(signature.bind(self, *args, **kwargs).arguments)
        for fix in fixes:
            fix(arguments)
        arguments.pop("self")
        extra = arguments.pop("kwargs", {})
        return stock(self, **arguments, **extra)

    return get_rope_index


def _split_video_grids(arguments: dict) -> None:
    """Each video grid (t, h, w) as t grids (1, h, w), as every other Qwen3-VL release splits them."""
    grids = arguments.get("video_grid_thw")
    if grids is not None:
        frames = torch.repeat_interleave(grids, grids[:, 0], dim=0)
        frames[:, 0] = 1
        arguments["video_grid_thw"] = frames


def _seconds_for_every_vision_run(arguments: dict) -> None:
    """``second_per_grid_ts`` with a 1 (the stock default) inserted for each image, in the order the stock
    loop meets the vision runs (row by row, unpadded tokens), so each video reads its own seconds."""
    seconds = arguments.get("second_per_grid_ts")
    if seconds is None:
        return
    videos = iter(list(seconds))
    types_, mask = arguments["mm_token_type_ids"], arguments.get("attention_mask")
    spread = []
    for b in range(types_.shape[0]):
        row = types_[b] if mask is None else types_[b][mask[b].bool()]
        runs = [int(t) for i, t in enumerate(row.tolist()) if t != 0 and (i == 0 or row[i - 1] != t)]
        spread += [next(videos) if kind == 2 else 1 for kind in runs]
    arguments["second_per_grid_ts"] = spread
