"""The fixed stock of transformers 5.3-5.5 (stock_fix.py) is stock's own rule where stock is right: on
releases with a correct ``get_vision_position_ids`` the written-out rule equals it on random grids, and
the fix is applied exactly where the installed method is wrong."""

from __future__ import annotations

import random

import pytest
import torch

from tests.patch.stock_fix import vision_positions, vision_positions_wrong
from tests.patch.tiny import MODELS, make_batch

# Two-frame and three-frame videos, one after an image: each fault of stock_fix.py shows on these rows.
ROWS = [[3, (1, 4, 6), 5, ("video", 2, 4, 4), 2], [7], [2, ("video", 3, 4, 4), 3, (1, 4, 4), 4]]


def _classes():
    return {family: type(MODELS[family]().model) for family in MODELS}


@pytest.mark.parametrize("family", list(MODELS))
def test_the_fixed_vision_positions_are_stock_where_stock_is_right(family):
    cls = _classes()[family]
    stock = getattr(cls, "get_vision_position_ids", None)
    if stock is None or vision_positions_wrong(cls):
        pytest.skip("this transformers has no correct get_vision_position_ids to compare with")
    rng = random.Random(0)
    for _ in range(20):
        merge, temporal = rng.choice([1, 2]), rng.choice([1, 2])
        grid = torch.tensor([temporal * rng.randint(1, 4), merge * rng.randint(1, 5), merge * rng.randint(1, 5)])
        args = dict(
            start_position=rng.randint(0, 50),
            grid_thw=grid,
            temp_merge_size=temporal,
            spatial_merge_size=merge,
            time_interval=rng.randint(1, 30),
        )
        assert torch.equal(vision_positions(None, **args), stock(None, **args)), args


@pytest.mark.parametrize("family", list(MODELS))
def test_the_fix_is_on_exactly_where_stock_is_wrong(family):
    model = MODELS[family]().model
    fixed = "get_vision_position_ids" in vars(model)
    assert fixed == vision_positions_wrong(type(model))
    if fixed:  # the fault the fix is for: one frame is right, a second frame is not
        one = dict(start_position=4, grid_thw=torch.tensor([1, 2, 3]), spatial_merge_size=1)
        two = {**one, "grid_thw": torch.tensor([2, 2, 3])}
        assert torch.equal(type(model).get_vision_position_ids(None, **one), vision_positions(None, **one))
        assert not torch.equal(type(model).get_vision_position_ids(None, **two), vision_positions(None, **two))


@pytest.mark.parametrize("family", list(MODELS))
def test_each_fix_is_for_a_fault_of_the_installed_stock(family):
    """Where a fix is on, the stock model without it positions an image-and-videos batch otherwise (or
    fails on it). Qwen3-VL's split grids have one frame each: there the fixed get_vision_position_ids
    alone changes nothing."""
    model = MODELS[family]().model
    fixed = {"get_vision_position_ids", "get_rope_index"} & set(vars(model))
    batch = make_batch(ROWS, padding="left", frames=family == "Qwen3-VL")
    if family == "Qwen2.5-VL":
        batch["second_per_grid_ts"] = torch.tensor([0.5, 1.7])
    keys = (
        "input_ids",
        "mm_token_type_ids",
        "image_grid_thw",
        "video_grid_thw",
        "attention_mask",
        "second_per_grid_ts",
    )
    args = {k: batch[k] for k in keys if k in batch}
    if not fixed:
        return
    want, _ = model.get_rope_index(**args)
    try:
        raw, _ = type(model).get_rope_index(_unfixed(model), **args)
    except (StopIteration, RuntimeError, IndexError):
        return
    one_frame_grids = family == "Qwen3-VL" and fixed == {"get_vision_position_ids"}
    assert torch.equal(raw, want) == one_frame_grids


def _unfixed(model):
    import copy

    raw = copy.copy(model)
    for name in ("get_vision_position_ids", "get_rope_index"):
        raw.__dict__.pop(name, None)
    return raw
