"""mcg_rope_index at modality_gap = vision_stride = 1 against transformers 5.x's stock ``get_rope_index`` of
every Qwen-VL family: Qwen2-VL, Qwen2.5-VL (temporal positions spaced by tokens_per_second ·
second_per_grid_ts) and Qwen3-VL (videos frame by frame, ``split_video_frames``), on random batches with
several images and videos per row (videos longer than their spatial extent too), left, right or no
padding, and text-only rows.

The stock methods run unbound on a stand-in ``self`` holding the family's real (default) config with a
tiny vision setting and the family's own ``get_vision_position_ids``; no weights are built.
"""

from __future__ import annotations

import functools
import random
from types import SimpleNamespace

import pytest
import torch

from clinkd_kernels.rope_index import mcg_rope_index

from .batches import IDS, M, mm_token_types, random_batch
from .impls import ALL_IMPLS

transformers = pytest.importorskip("transformers")

ROW_KW = dict(max_items=5, p_image=0.4, p_video=0.4)  # several images and videos per row


def _stock(family: str, tokens_per_second: int = 2):
    """The family's ``get_rope_index`` bound to a stand-in model of config ``vision_config``."""
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel as Model

        vision = dict(spatial_merge_size=M)
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel as Model

        vision = dict(spatial_merge_size=M, tokens_per_second=tokens_per_second)
    else:
        from transformers import Qwen3VLConfig as Config
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel as Model

        vision = dict(spatial_merge_size=M)
    config = Config(vision_config=vision)
    model = SimpleNamespace(
        config=config, get_vision_position_ids=functools.partial(Model.get_vision_position_ids, None)
    )
    return functools.partial(Model.get_rope_index, model)


def _batch(padding, **row_kw):
    """(input_ids, attention_mask or None, image grid, video grid); padding "none": padded slots become text."""
    side = "random" if padding == "none" else padding
    ids, mask, grid, vgrid, _ = random_batch(random.randint(2, 6), padding=side, **ROW_KW, **row_kw)
    if padding == "none":
        ids, mask = torch.where(mask.bool(), ids, 7), None
    return ids, mask, grid, vgrid


def _grids(grid, vgrid):
    return dict(image_grid_thw=grid if len(grid) else None, video_grid_thw=vgrid if len(vgrid) else None)


def _check(impl, stock_out, ids, **kw):
    want_pos, want_deltas = stock_out
    pos, deltas = ALL_IMPLS[impl](ids, modality_gap=1, vision_stride=1, pad_position=0, **IDS, **kw)
    assert torch.equal(pos, want_pos), (ids, kw)
    assert torch.equal(deltas, want_deltas.view(-1, 1)), (ids, kw)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("padding", ["left", "right", "random", "none"])
def test_qwen2_vl(impl, padding):
    stock = _stock("qwen2_vl")
    for _ in range(6):
        ids, mask, grid, vgrid = _batch(padding)
        want = stock(ids, mm_token_types(ids), attention_mask=mask, **_grids(grid, vgrid))
        _check(impl, want, ids, attention_mask=mask, image_grid_thw=grid, video_grid_thw=vgrid)


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("tokens_per_second", [2, 4])
@pytest.mark.parametrize("padding", ["left", "right", "random", "none"])
def test_qwen2_5_vl(impl, tokens_per_second, padding):
    stock = _stock("qwen2_5_vl", tokens_per_second)
    for _ in range(6):
        ids, mask, grid, vgrid = _batch(padding, max_t=8)
        # as the processor returns it: float32 seconds per temporal grid
        seconds = torch.tensor(
            [random.choice([0.5, 1.0, 1.7, random.uniform(0.1, 3.0)]) for _ in range(len(vgrid))], dtype=torch.float32
        )
        want = stock(ids, mm_token_types(ids), second_per_grid_ts=seconds, attention_mask=mask, **_grids(grid, vgrid))
        _check(
            impl,
            want,
            ids,
            attention_mask=mask,
            image_grid_thw=grid,
            video_grid_thw=vgrid,
            video_time_interval=tokens_per_second * seconds,
        )
        # without second_per_grid_ts stock spaces frames by tokens_per_second itself
        want = stock(ids, mm_token_types(ids), attention_mask=mask, **_grids(grid, vgrid))
        _check(
            impl,
            want,
            ids,
            attention_mask=mask,
            image_grid_thw=grid,
            video_grid_thw=vgrid,
            video_time_interval=float(tokens_per_second),
        )


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("padding", ["left", "right", "random", "none"])
def test_qwen3_vl(impl, padding):
    stock = _stock("qwen3_vl")
    for _ in range(6):
        ids, mask, grid, vgrid = _batch(padding, split_frames=True)
        want = stock(ids, mm_token_types(ids), attention_mask=mask, **_grids(grid, vgrid))
        _check(impl, want, ids, attention_mask=mask, image_grid_thw=grid, video_grid_thw=vgrid, split_video_frames=True)


def test_families_differ_where_expected():
    """One batch, three families: the checks above are not vacuous (the rules do differ on videos)."""
    while True:
        ids, mask, grid, vgrid, _ = random_batch(3, padding="left", **ROW_KW)
        if len(vgrid) and (vgrid[:, 0] > 1).any():
            break
    kw = dict(attention_mask=mask, **_grids(grid, vgrid))
    qwen2 = _stock("qwen2_vl")(ids, mm_token_types(ids), **kw)
    qwen25 = _stock("qwen2_5_vl", 4)(ids, mm_token_types(ids), second_per_grid_ts=torch.ones(len(vgrid)), **kw)
    assert not torch.equal(qwen2[0], qwen25[0])
    ours = mcg_rope_index(
        ids,
        image_grid_thw=grid,
        video_grid_thw=vgrid,
        attention_mask=mask,
        modality_gap=1,
        pad_position=0,
        video_time_interval=4.0,
        **IDS,
    )
    assert torch.equal(ours[0], qwen25[0])
    # Qwen3-VL on the same grids laid out frame by frame is a different batch; on Qwen2-VL's layout it refuses
    with pytest.raises(ValueError, match="video runs but video_grid_thw has"):
        mcg_rope_index(
            ids, video_grid_thw=vgrid, image_grid_thw=grid, attention_mask=mask, split_video_frames=True, **IDS
        )
