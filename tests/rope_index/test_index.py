"""MCG-RoPE position indices: the paper's table, hand-derived cases (the 5.x advance rule after videos,
time intervals, split frames), transformers' Qwen2-VL at gap 1, the per-row reference on random batches
(both vectorised paths), batch independence, errors, decode positions. The other families against
transformers: test_families.py."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from clinkd_kernels.rope_index import mcg_rope_index, mcg_rope_index_reference, mrope_decode_position_ids
from clinkd_kernels.rope_index.op import _mcg_rope_index_op

from .batches import IDS, IMG, VE, VID, VS, M, mm_token_types, random_batch, random_intervals, text
from .impls import ALL_IMPLS, IMPLS

T = 7  # a text token


def _grid(*rows):
    return torch.tensor(rows, dtype=torch.long).view(-1, 3)


def _ids(*toks):
    return torch.tensor([list(toks)], dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# Hand-derived expectations


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "gap, expected",
    [
        # the worked example of docs/method.md: tokens [T, T, <vs>, 4 image tokens (grid 1x4x4 -> 2x2), <ve>, T, T]
        (1, [[0, 1, 2, 3, 3, 3, 3, 5, 6, 7], [0, 1, 2, 3, 3, 4, 4, 5, 6, 7], [0, 1, 2, 3, 4, 3, 4, 5, 6, 7]]),
        (2, [[0, 1, 2, 4, 4, 4, 4, 7, 8, 9], [0, 1, 2, 4, 4, 5, 5, 7, 8, 9], [0, 1, 2, 4, 5, 4, 5, 7, 8, 9]]),
    ],
)
def test_paper_example(impl, gap, expected):
    ids = _ids(T, T, VS, IMG, IMG, IMG, IMG, VE, T, T)
    pos, deltas = IMPLS[impl](ids, image_grid_thw=_grid((1, 4, 4)), modality_gap=gap, **IDS)
    assert pos.tolist() == [[row] for row in expected]
    assert deltas.tolist() == [[max(expected[0]) + 1 - 10]]


@pytest.mark.parametrize("impl", IMPLS)
def test_two_images_gap2_by_hand(impl):
    # [T, <vs>] 0 1 | image 2x2 at base 1+2=3 | [<ve>, <vs>] at 4+2=6 | image 2x3 at 7+2=9 | [<ve>, T] at 11+2=13
    ids = _ids(T, VS, *[IMG] * 4, VE, VS, *[IMG] * 6, VE, T)
    pos, deltas = IMPLS[impl](ids, image_grid_thw=_grid((1, 4, 4), (1, 4, 6)), modality_gap=2, **IDS)
    assert pos[:, 0].tolist() == [
        [0, 1, 3, 3, 3, 3, 6, 7, 9, 9, 9, 9, 9, 9, 13, 14],
        [0, 1, 3, 3, 4, 4, 6, 7, 9, 9, 9, 10, 10, 10, 13, 14],
        [0, 1, 3, 4, 3, 4, 6, 7, 9, 10, 11, 9, 10, 11, 13, 14],
    ]
    assert deltas.tolist() == [[14 + 1 - 16]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "gap, stride, expected",
    [
        # grid 1x4x6 -> H=2, W=3; h = b + hi*stride, w = b + wi*stride
        (1, 2, [[0, 1, 2, 2, 2, 2, 2, 2, 7], [0, 1, 2, 2, 2, 4, 4, 4, 7], [0, 1, 2, 4, 6, 2, 4, 6, 7]]),
        (2, 2, [[0, 1, 3, 3, 3, 3, 3, 3, 9], [0, 1, 3, 3, 3, 5, 5, 5, 9], [0, 1, 3, 5, 7, 3, 5, 7, 9]]),
    ],
)
def test_vision_stride_by_hand(impl, gap, stride, expected):
    ids = _ids(T, VS, *[IMG] * 6, VE)
    pos, deltas = IMPLS[impl](ids, image_grid_thw=_grid((1, 4, 6)), modality_gap=gap, vision_stride=stride, **IDS)
    assert pos[:, 0].tolist() == expected
    assert deltas.tolist() == [[expected[2][-1] + 1 - 9]]


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize(
    "gap, expected",
    [
        # video grid (3, 2, 2): 3 frames of 1x1 tokens (H = W = 1) at base b = 1 + gap: t = b, b+1, b+2, h = w = b.
        # The text after it starts at its largest spatial position + gap = b + (max(H, W) - 1) + gap = b + gap
        # (transformers 5.x: current_pos += max(h, w) // m), not after its last frame.
        # gap 1: [T, <vs>] 0 1 | video b=2: t 2 3 4, h w 2 2 2 | [<ve>, T] from 2+0+1 = 3: 3 4
        (1, [[0, 1, 2, 3, 4, 3, 4], [0, 1, 2, 2, 2, 3, 4], [0, 1, 2, 2, 2, 3, 4]]),
        # gap 2: [T, <vs>] 0 1 | video b=3: t 3 4 5, h w 3 3 3 | [<ve>, T] from 3+0+2 = 5: 5 6
        (2, [[0, 1, 3, 4, 5, 5, 6], [0, 1, 3, 3, 3, 5, 6], [0, 1, 3, 3, 3, 5, 6]]),
    ],
)
def test_long_video_by_hand(impl, gap, expected):
    ids = _ids(T, VS, VID, VID, VID, VE, T)
    pos, deltas = ALL_IMPLS[impl](ids, video_grid_thw=_grid((3, 2, 2)), modality_gap=gap, **IDS)
    assert pos[:, 0].tolist() == expected
    assert deltas.tolist() == [[max(map(max, expected)) + 1 - 7]]  # gap 1: 4+1-7; gap 2: 6+1-7


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_long_video_with_stride_by_hand(impl):
    # [T, <vs>, video (4, 4, 4): 4 frames of 2x2, <ve>, T], gap 2, stride 2; t - 1 = 3 > (max(H, W) - 1)·α = 2
    # [T, <vs>] 0 1 | video b = 1+2 = 3: t 3,4,5,6 per frame; h 3 3 5 5; w 3 5 3 5
    # | [<ve>, T] from b + (2-1)·2 + 2 = 7: 7 8   (the 4.x rule restarted after t = 6: at 8)
    ids = _ids(T, VS, *[VID] * 16, VE, T)
    pos, deltas = ALL_IMPLS[impl](ids, video_grid_thw=_grid((4, 4, 4)), modality_gap=2, vision_stride=2, **IDS)
    assert pos[:, 0].tolist() == [
        [0, 1] + [3] * 4 + [4] * 4 + [5] * 4 + [6] * 4 + [7, 8],
        [0, 1] + [3, 3, 5, 5] * 4 + [7, 8],
        [0, 1] + [3, 5, 3, 5] * 4 + [7, 8],
    ]
    assert deltas.tolist() == [[8 + 1 - 20]]


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize(
    "gap, expected, largest",
    [
        # [<vs>, video (4, 2, 2): 4 frames of 1 token, <ve>]: the row's largest position is the last frame's t,
        # not the last token's. gap 1: <vs> 0 | video b=1: t 1..4, h w 1 | <ve> at 1+0+1 = 2
        (1, [[0, 1, 2, 3, 4, 2], [0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 2]], 4),
        # gap 2: <vs> 0 | video b=2: t 2..5, h w 2 | <ve> at 2+0+2 = 4
        (2, [[0, 2, 3, 4, 5, 4], [0, 2, 2, 2, 2, 4], [0, 2, 2, 2, 2, 4]], 5),
    ],
)
def test_deltas_count_frames_past_the_end(impl, gap, expected, largest):
    ids = _ids(VS, *[VID] * 4, VE)
    pos, deltas = ALL_IMPLS[impl](ids, video_grid_thw=_grid((4, 2, 2)), modality_gap=gap, **IDS)
    assert pos[:, 0].tolist() == expected
    assert deltas.tolist() == [[largest + 1 - 6]]


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize(
    "gap, stride, expected, largest",
    [
        # [T, <vs>, video (3, 2, 4): 3 frames of 1x2, <ve>, T, <vs>, image (1, 4, 4), <ve>], interval float32(3.4):
        # T(ti) = int(ti·3.4) = 0, 3 (3.4), 6 (6.8). Images keep interval 1.
        # gap 1: [T, <vs>] 0 1 | video b=2: t 2 2 5 5 8 8, h 2, w 2 3 2 3 2 3 | [<ve>, T, <vs>] from 2+1+1 = 4: 4 5 6
        #        | image b=7: t 7, h 7 7 8 8, w 7 8 7 8 | <ve> at 7+1+1 = 9
        (
            1,
            1,
            [
                [0, 1, 2, 2, 5, 5, 8, 8, 4, 5, 6, 7, 7, 7, 7, 9],
                [0, 1, 2, 2, 2, 2, 2, 2, 4, 5, 6, 7, 7, 8, 8, 9],
                [0, 1, 2, 3, 2, 3, 2, 3, 4, 5, 6, 7, 8, 7, 8, 9],
            ],
            9,
        ),
        # gap 2, stride 2 (α not applied to t): [T, <vs>] 0 1 | video b=3: t 3 3 6 6 9 9, h 3, w 3 5 ...
        #        | text from 3+(2-1)·2+2 = 7: 7 8 9 | image b=11: h 11 11 13 13, w 11 13 11 13 | <ve> at 11+2+2 = 15
        (
            2,
            2,
            [
                [0, 1, 3, 3, 6, 6, 9, 9, 7, 8, 9, 11, 11, 11, 11, 15],
                [0, 1, 3, 3, 3, 3, 3, 3, 7, 8, 9, 11, 11, 13, 13, 15],
                [0, 1, 3, 5, 3, 5, 3, 5, 7, 8, 9, 11, 13, 11, 13, 15],
            ],
            15,
        ),
    ],
)
def test_time_interval_by_hand(impl, gap, stride, expected, largest):
    ids = _ids(T, VS, *[VID] * 6, VE, T, VS, *[IMG] * 4, VE)
    for interval in (3.4, torch.tensor([3.4]), 2 * torch.tensor([1.7])):  # 2·float32(1.7) == float32(3.4)
        pos, deltas = ALL_IMPLS[impl](
            ids,
            image_grid_thw=_grid((1, 4, 4)),
            video_grid_thw=_grid((3, 2, 4)),
            video_time_interval=interval,
            modality_gap=gap,
            vision_stride=stride,
            **IDS,
        )
        assert pos[:, 0].tolist() == expected
        assert deltas.tolist() == [[largest + 1 - 16]]


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_time_interval_truncates_the_float32_product(impl):
    # video (11, 2, 2): 11 frames of 1 token after <vs> (base 1), interval 0.7. ti·0.7 = 0, .7, 1.4, 2.1, 2.8,
    # 3.5, 4.2, 4.9, 5.6, 6.3, 7.0, truncated: 0 0 1 2 2 3 4 4 5 6 7. The last one is the float32 product:
    # float32(0.7) = 0.699999988..., times 10 = 6.99999988... exactly, which rounds to 7.0 in float32 (stock
    # computes in float32), though a float64 product of the same value would truncate to 6.
    assert int(10 * float(np.float32(0.7))) == 6
    ids = _ids(VS, *[VID] * 11, VE)
    pos, deltas = ALL_IMPLS[impl](ids, video_grid_thw=_grid((11, 2, 2)), video_time_interval=0.7, modality_gap=1, **IDS)
    want_t = [0] + [1 + v for v in (0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 7)] + [2]  # <ve> at 1 + 0 + 1
    assert pos[0, 0].tolist() == want_t
    assert pos[1, 0].tolist() == pos[2, 0].tolist() == [0] + [1] * 11 + [2]
    assert deltas.tolist() == [[8 + 1 - 13]]
    # interval 0: every frame at the base; 0.5: 0 0 1 1 2 ...
    for interval, offsets in ((0.0, [0] * 11), (0.5, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5])):
        pos, _ = ALL_IMPLS[impl](
            ids, video_grid_thw=_grid((11, 2, 2)), video_time_interval=interval, modality_gap=1, **IDS
        )
        assert pos[0, 0].tolist() == [0] + [1 + v for v in offsets] + [2]


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize(
    "gap, expected",
    [
        # Qwen3-VL layout: [T, <t0>, <vs>, frame 0 (1x2), <ve>, <t1>, <vs>, frame 1, <ve>, T], grid (2, 2, 4) split
        # into two (1, 2, 4) runs. gap 1: text 0 1 2 | frame b=3: t h 3, w 3 4 | text from 3+1+1 = 5: 5 6 7
        # | frame b=8: w 8 9 | text from 8+1+1 = 10: 10 11
        (
            1,
            [
                [0, 1, 2, 3, 3, 5, 6, 7, 8, 8, 10, 11],
                [0, 1, 2, 3, 3, 5, 6, 7, 8, 8, 10, 11],
                [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
            ],
        ),
        # gap 2: text 0 1 2 | frame b=4: w 4 5 | text from 4+1+2 = 7: 7 8 9 | frame b=11: w 11 12 | text 14 15
        (
            2,
            [
                [0, 1, 2, 4, 4, 7, 8, 9, 11, 11, 14, 15],
                [0, 1, 2, 4, 4, 7, 8, 9, 11, 11, 14, 15],
                [0, 1, 2, 4, 5, 7, 8, 9, 11, 12, 14, 15],
            ],
        ),
    ],
)
def test_split_video_frames_by_hand(impl, gap, expected):
    ids = _ids(T, T, VS, VID, VID, VE, T, VS, VID, VID, VE, T)
    pos, deltas = ALL_IMPLS[impl](
        ids, video_grid_thw=_grid((2, 2, 4)), split_video_frames=True, modality_gap=gap, **IDS
    )
    assert pos[:, 0].tolist() == expected
    assert deltas.tolist() == [[expected[0][-1] + 1 - 12]]
    with pytest.raises(ValueError, match=r"2 video runs but video_grid_thw has 1 rows"):
        ALL_IMPLS[impl](ids, video_grid_thw=_grid((2, 2, 4)), modality_gap=gap, **IDS)  # not split: one run


@pytest.mark.parametrize("impl", IMPLS)
def test_video_frames_and_image_by_hand(impl):
    # image 2x2 then video (2, 4, 4): 2 frames of 2x2, gap 2
    ids = _ids(VS, *[IMG] * 4, VE, VS, *[VID] * 8, VE)
    pos, _ = IMPLS[impl](ids, image_grid_thw=_grid((1, 4, 4)), video_grid_thw=_grid((2, 4, 4)), modality_gap=2, **IDS)
    # [<vs>] 0 | image base 2: max 3 | [<ve>, <vs>] 5 6 | video base 8: t 8,9 h 8,9 w 8,9 | [<ve>] 11
    assert pos[:, 0].tolist() == [
        [0, 2, 2, 2, 2, 5, 6, 8, 8, 8, 8, 9, 9, 9, 9, 11],
        [0, 2, 2, 3, 3, 5, 6, 8, 8, 9, 9, 8, 8, 9, 9, 11],
        [0, 2, 3, 2, 3, 5, 6, 8, 9, 8, 9, 8, 9, 8, 9, 11],
    ]


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_and_text_only_rows(impl):
    # row 0 left-padded paper example, row 1 text only right-padded, row 2 all padding
    ids = torch.tensor([[0, 0, T, T, VS, IMG, IMG, IMG, IMG, VE, T, T], [T, T, T, T, T, 0, 0, 0, 0, 0, 0, 0], [0] * 12])
    mask = torch.tensor([[0, 0] + [1] * 10, [1] * 5 + [0] * 7, [0] * 12])
    pos, deltas = IMPLS[impl](
        ids, image_grid_thw=_grid((1, 4, 4)), attention_mask=mask, modality_gap=2, pad_position=-5, **IDS
    )
    assert pos[:, 0].tolist() == [
        [-5, -5] + row
        for row in ([0, 1, 2, 4, 4, 4, 4, 7, 8, 9], [0, 1, 2, 4, 4, 5, 5, 7, 8, 9], [0, 1, 2, 4, 5, 4, 5, 7, 8, 9])
    ]
    assert pos[:, 1].tolist() == [[0, 1, 2, 3, 4] + [-5] * 7] * 3
    assert pos[:, 2].tolist() == [[-5] * 12] * 3
    assert deltas.tolist() == [[0], [0], [0]]


# --------------------------------------------------------------------------------------------------
# transformers' Qwen2-VL at gap 1


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    transformers.logging.set_verbosity_error()
    config = Qwen2VLConfig(
        text_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=160,
        ),
        vision_config=dict(depth=1, embed_dim=8, hidden_size=16, num_heads=2, spatial_merge_size=M),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
    )
    return Qwen2VLModel(config).eval()


def _hf_rope_index(model, ids, mask, grid, vgrid):
    return model.get_rope_index(
        ids,
        mm_token_types(ids),
        image_grid_thw=grid if len(grid) else None,
        video_grid_thw=vgrid if len(vgrid) else None,
        attention_mask=mask,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padding", ["left", "right", "random"])
def test_matches_transformers_at_gap_1(hf_model, impl, padding):
    for _ in range(4):
        ids, mask, grid, vgrid, _ = random_batch(random.randint(2, 6), padding=padding)  # long videos too
        want_pos, want_deltas = _hf_rope_index(hf_model, ids, mask, grid, vgrid)
        pos, deltas = IMPLS[impl](
            ids,
            image_grid_thw=grid,
            video_grid_thw=vgrid,
            attention_mask=mask,
            modality_gap=1,
            vision_stride=1,
            pad_position=0,
            **IDS,
        )
        assert torch.equal(pos, want_pos), (ids, grid, vgrid)
        assert torch.equal(deltas, want_deltas.view(-1, 1))


def test_matches_transformers_without_mask(hf_model):
    rows = [text(3) + [VS] + [IMG] * 6 + [VE] + text(2) + [VS] + [IMG] * 4 + [VE] + text(4)]
    ids = torch.tensor(rows * 3)
    grid = _grid(*[(1, 4, 6), (1, 4, 4)] * 3)
    want_pos, want_deltas = _hf_rope_index(hf_model, ids, None, grid, torch.empty(0, 3, dtype=torch.long))
    pos, deltas = mcg_rope_index(ids, image_grid_thw=grid, modality_gap=1, **IDS)
    assert torch.equal(pos, want_pos)
    assert torch.equal(deltas, want_deltas.view(-1, 1))


# --------------------------------------------------------------------------------------------------
# Random batches against the per-row reference


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("videos", ["plain", "interval", "split"])
def test_random_batches_match_reference(impl, videos):
    for _ in range(25):
        ids, mask, grid, vgrid, _ = random_batch(
            random.randint(1, 7), extra=random.randint(0, 3), p_video=0.35, split_frames=videos == "split"
        )
        u = random.random()
        if u < 0.25:  # holes inside rows too (never inside a vision run or before it)
            hole = (torch.rand(mask.shape) < 0.2) & ~torch.isin(ids, torch.tensor([IMG, VID, VS]))
            mask = mask * ~hole
        elif u < 0.4:  # no mask: padding slots become text
            ids, mask = torch.where(mask.bool(), ids, T), None
        kw = dict(
            image_grid_thw=grid,
            video_grid_thw=vgrid,
            attention_mask=mask,
            modality_gap=random.randint(1, 3),
            vision_stride=random.randint(1, 3),
            **IDS,
        )
        if videos == "interval":
            kw["video_time_interval"] = random_intervals(len(vgrid)) if random.random() < 0.8 else random.uniform(0, 5)
        elif videos == "split":
            kw["split_video_frames"] = True
        want = mcg_rope_index_reference(ids, **kw)
        got = ALL_IMPLS[impl](ids, **kw)
        assert torch.equal(got[0], want[0]), (ids, kw)
        assert torch.equal(got[1], want[1]), (ids, kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_are_independent(impl):
    ids, mask, grid, vgrid, rows = random_batch(16, extra=2)
    pos, deltas = IMPLS[impl](ids, image_grid_thw=grid, video_grid_thw=vgrid, attention_mask=mask, **IDS)
    i = v = 0
    for b in range(16):
        n_img = sum(1 for j, t in enumerate(rows[b]) if t == IMG and (j == 0 or rows[b][j - 1] != IMG))
        n_vid = sum(1 for j, t in enumerate(rows[b]) if t == VID and (j == 0 or rows[b][j - 1] != VID))
        alone = IMPLS[impl](
            ids[b : b + 1],
            image_grid_thw=grid[i : i + n_img],
            video_grid_thw=vgrid[v : v + n_vid],
            attention_mask=mask[b : b + 1],
            **IDS,
        )
        i, v = i + n_img, v + n_vid
        assert torch.equal(pos[:, b : b + 1], alone[0])
        assert torch.equal(deltas[b : b + 1], alone[1])


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("stride, intervals", [(2**20, False), (2**20, True), (1, True)])
def test_large_positions(impl, stride, intervals):
    # stride 2^20 puts positions past float32's exact range (the device path switches to float64); intervals
    # of 3e7 and 1e9 put temporal offsets past 2^24 (integers a float32 holds, added to the bases in int64)
    ids, mask, grid, vgrid, _ = random_batch(3, p_video=0.5)
    kw = dict(
        image_grid_thw=grid, video_grid_thw=vgrid, attention_mask=mask, modality_gap=5, vision_stride=stride, **IDS
    )
    if intervals:
        kw["video_time_interval"] = torch.tensor([random.choice([3e7, 1e9, 0.7]) for _ in range(len(vgrid))])
    want = mcg_rope_index_reference(ids, **kw)
    got = ALL_IMPLS[impl](ids, **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_long_text_row():
    S = 70_001  # beyond the host path's cached arange
    ids = torch.full((1, S), T)
    pos, deltas = mcg_rope_index(ids, **IDS)
    assert torch.equal(pos, torch.arange(S).expand(3, 1, S)) and deltas.item() == 0


def test_input_forms():
    ids, mask, grid, vgrid, _ = random_batch(3)
    want = mcg_rope_index(ids, image_grid_thw=grid, video_grid_thw=vgrid, attention_mask=mask, **IDS)
    got = mcg_rope_index(
        ids.int(), image_grid_thw=grid.int(), video_grid_thw=vgrid.int(), attention_mask=mask.bool(), **IDS
    )
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    wide = torch.zeros(ids.shape[0], ids.shape[1] * 2, dtype=torch.long)
    wide[:, ::2] = ids  # non-contiguous input_ids
    got = mcg_rope_index(wide[:, ::2], image_grid_thw=grid, video_grid_thw=vgrid, attention_mask=mask, **IDS)
    assert torch.equal(got[0], want[0]) and got[0].dtype == torch.long and got[1].shape == (ids.shape[0], 1)
    empty = mcg_rope_index(ids[:0], **IDS)
    assert empty[0].shape == (3, 0, ids.shape[1]) and empty[1].shape == (0, 1)


def test_custom_op_opcheck():
    ids, mask, grid, vgrid, _ = random_batch(3)
    torch.library.opcheck(_mcg_rope_index_op, (ids, grid, vgrid, mask, IMG, VID, VS, M, 2, 1, 1, None, False))
    interval = random_intervals(len(vgrid))
    torch.library.opcheck(_mcg_rope_index_op, (ids, grid, vgrid, mask, IMG, VID, VS, M, 2, 1, 0, interval, False))
    ids, mask, grid, vgrid, _ = random_batch(3, split_frames=True)
    torch.library.opcheck(_mcg_rope_index_op, (ids, grid, vgrid, mask, IMG, VID, VS, M, 1, 2, 1, None, True))


def test_compiled_matches_eager():
    ids, mask, grid, vgrid, _ = random_batch(3, p_video=0.5)
    kw = dict(image_grid_thw=grid, video_grid_thw=vgrid, attention_mask=mask, **IDS)
    interval = random_intervals(len(vgrid))
    fn = torch.compile(lambda i, iv: mcg_rope_index(i, video_time_interval=iv, **kw), fullgraph=True, backend="eager")
    want = mcg_rope_index(ids, video_time_interval=interval, **kw)
    got = fn(ids, interval)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("impl", IMPLS)
def test_error_run_count_names_row(impl):
    ids = torch.tensor([[T, VS, *[IMG] * 4, VE], [VS, *[IMG] * 4, VE, T]])
    with pytest.raises(ValueError, match=r"2 image runs but image_grid_thw has 1 rows.*row 1"):
        IMPLS[impl](ids, image_grid_thw=_grid((1, 4, 4)), **IDS)
    with pytest.raises(ValueError, match=r"2 image runs but image_grid_thw has 3 rows"):
        IMPLS[impl](ids, image_grid_thw=_grid((1, 4, 4), (1, 4, 4), (1, 4, 4)), **IDS)
    with pytest.raises(ValueError, match=r"2 image runs but image_grid_thw has 0 rows"):
        IMPLS[impl](ids, **IDS)
    with pytest.raises(ValueError, match=r"1 video runs but video_grid_thw has 0 rows.*row 0"):
        IMPLS[impl](_ids(VS, VID, VE), **IDS)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_error_grids_for_a_batch_of_padding(impl):
    # no unpadded token, one grid row: both paths refuse (the host path used to ignore the grid)
    ids, mask = _ids(VS, *[IMG] * 4, VE), torch.zeros(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"0 image runs but image_grid_thw has 1 rows"):
        ALL_IMPLS[impl](ids, image_grid_thw=_grid((1, 4, 4)), attention_mask=mask, **IDS)
    with pytest.raises(ValueError, match=r"0 video runs but video_grid_thw has 1 rows of 2 frames"):
        ALL_IMPLS[impl](ids, video_grid_thw=_grid((2, 4, 4)), attention_mask=mask, split_video_frames=True, **IDS)
    pos, deltas = ALL_IMPLS[impl](ids, attention_mask=mask, **IDS)
    assert pos.eq(1).all() and deltas.tolist() == [[0]]


@pytest.mark.parametrize("impl", IMPLS)
def test_error_run_length_names_row_and_counts(impl):
    ids = torch.tensor([[T, VS, *[IMG] * 4, VE, T], [T, VS, *[IMG] * 5, VE]])
    with pytest.raises(ValueError, match=r"row 1: image run .* has 5 tokens .*image_grid_thw\[1\].* 4"):
        IMPLS[impl](ids, image_grid_thw=_grid((1, 4, 4), (1, 4, 4)), **IDS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [(1, 3, 4), (1, 4, 5), (0, 4, 4), (1, 0, 4)])
def test_error_grid_not_divisible(impl, bad):
    with pytest.raises(ValueError, match=r"image_grid_thw\[1\].*spatial_merge_size=2"):
        IMPLS[impl](
            torch.tensor([[VS, *[IMG] * 4, VE, VS, *[IMG] * 3, VE]]), image_grid_thw=_grid((1, 4, 4), bad), **IDS
        )


@pytest.mark.parametrize("impl", IMPLS)
def test_error_missing_vision_start(impl):
    ids = torch.tensor([[T, VS, *[IMG] * 4, VE], [T, T, *[IMG] * 4, VE]])
    with pytest.raises(ValueError, match=r"row 1: vision run at token 2 .*vision_start"):
        IMPLS[impl](ids, image_grid_thw=_grid((1, 4, 4), (1, 4, 4)), **IDS)
    kw = dict(IDS, vision_start_token_id=None)
    IMPLS[impl](ids, image_grid_thw=_grid((1, 4, 4), (1, 4, 4)), **kw)  # not checked without the id


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_error_time_interval_values(impl):
    ids = _ids(VS, VID, VID, VE, VS, *[VID] * 4, VE)  # videos (2, 2, 2) and (1, 4, 4)
    kw = dict(video_grid_thw=_grid((2, 2, 2), (1, 4, 4)), **IDS)
    for bad, i, shown in (([1.0, float("nan")], 1, "nan"), ([-1.0, 1.0], 0, "-1"), ([float("inf"), 1.0], 0, "inf")):
        with pytest.raises(ValueError, match=rf"video_time_interval\[{i}\] = {shown}: .*finite and >= 0"):
            ALL_IMPLS[impl](ids, video_time_interval=torch.tensor(bad), **kw)
    # the last frame's offset 1·1e20 is beyond 2^53; a one-frame video may have any finite interval (0·1e30 = 0)
    with pytest.raises(
        ValueError, match=r"video_time_interval\[0\] = 1e\+20 puts frame 1 of video_grid_thw\[0\].*2\^53"
    ):
        ALL_IMPLS[impl](ids, video_time_interval=torch.tensor([1e20, 1.0]), **kw)
    pos, _ = ALL_IMPLS[impl](ids, video_time_interval=torch.tensor([1.0, 1e30]), modality_gap=1, **kw)
    # <vs> 0 | video (2, 2, 2) b=1: t 1 2 | <ve> <vs> from 1+0+1: 2 3 | video (1, 4, 4) b=4: t 4 (x4) | <ve> 4+1+1
    assert pos[0, 0].tolist() == [0, 1, 2, 2, 3, 4, 4, 4, 4, 6]


def test_error_time_interval_arguments():
    ids = _ids(VS, VID, VID, VE, VS, *[VID] * 4, VE)
    kw = dict(video_grid_thw=_grid((2, 2, 2), (1, 4, 4)), **IDS)
    with pytest.raises(ValueError, match=r"video_time_interval has 1 values but video_grid_thw has 2 rows"):
        mcg_rope_index(ids, video_time_interval=torch.tensor([1.0]), **kw)
    with pytest.raises(ValueError, match=r"video_time_interval has 1 values but video_grid_thw has 0 rows"):
        mcg_rope_index(_ids(T, T), video_time_interval=torch.tensor([1.0]), **IDS)
    with pytest.raises(ValueError, match=r"video_time_interval must be 1-D"):
        mcg_rope_index(ids, video_time_interval=torch.ones(2, 1), **kw)
    with pytest.raises(TypeError, match=r"video_time_interval must have dtype"):
        mcg_rope_index(ids, video_time_interval=torch.tensor([1, 2]), **kw)
    for bad in (float("nan"), -0.5, float("inf")):
        with pytest.raises(ValueError, match=r"video_time_interval must be a finite number >= 0"):
            mcg_rope_index(ids, video_time_interval=bad, **kw)
    with pytest.raises(TypeError, match=r"video_time_interval must be a float"):
        mcg_rope_index(ids, video_time_interval=True, **kw)
    for interval in (1.0, torch.tensor([1.0, 1.0])):
        with pytest.raises(ValueError, match=r"video_time_interval with split_video_frames=True"):
            mcg_rope_index(ids, video_time_interval=interval, split_video_frames=True, **kw)
    with pytest.raises(TypeError, match=r"split_video_frames must be a bool"):
        mcg_rope_index(ids, split_video_frames=1, **kw)
    # float64 intervals are rounded to float32 (stock's precision), ints are floats: same positions
    a = mcg_rope_index(ids, video_time_interval=torch.tensor([0.7, 2.0], dtype=torch.float64), **kw)
    b = mcg_rope_index(ids, video_time_interval=torch.tensor([0.7, 2.0]), **kw)
    assert torch.equal(a[0], b[0])
    assert torch.equal(
        mcg_rope_index(ids, video_time_interval=2, **kw)[0],
        mcg_rope_index(ids, video_time_interval=torch.tensor([2.0, 2.0]), **kw)[0],
    )


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_error_split_frames(impl):
    ids = _ids(VS, VID, VID, VE, T, VS, VID, VID, VE, T, VS, VID, VID, VE)  # three frame runs of 2 tokens
    with pytest.raises(ValueError, match=r"3 video runs but video_grid_thw has 1 rows of 2 frames in all \(split"):
        ALL_IMPLS[impl](ids, video_grid_thw=_grid((2, 2, 4)), split_video_frames=True, **IDS)
    with pytest.raises(ValueError, match=r"1 rows of 1099511627776 frames"):  # not expanded: no batch matches
        ALL_IMPLS[impl](ids, video_grid_thw=_grid((2**40, 2, 4)), split_video_frames=True, **IDS)
    with pytest.raises(ValueError, match=r"video_grid_thw\[0\].*t must be >= 1"):
        ALL_IMPLS[impl](ids, video_grid_thw=_grid((0, 2, 4), (3, 2, 4)), split_video_frames=True, **IDS)
    ids = _ids(VS, VID, VID, VE, T, VS, VID, VID, VID, VE)  # frame 1 has 3 tokens
    with pytest.raises(
        ValueError,
        match=r"row 0: video run at token 6 has 3 tokens but video_grid_thw\[1\] frame 0 "
        r"\(split_video_frames\) = \(1, 2, 4\) needs .* = 2",
    ):
        ALL_IMPLS[impl](ids, video_grid_thw=_grid((1, 2, 4), (1, 2, 4)), split_video_frames=True, **IDS)


def test_error_arguments():
    ids = _ids(T, VS, *[IMG] * 4, VE)
    g = _grid((1, 4, 4))
    with pytest.raises(TypeError, match="input_ids"):
        mcg_rope_index(ids.float(), image_grid_thw=g, **IDS)
    with pytest.raises(ValueError, match="input_ids"):
        mcg_rope_index(ids[0], image_grid_thw=g, **IDS)
    with pytest.raises(ValueError, match="image_grid_thw"):
        mcg_rope_index(ids, image_grid_thw=g[:, :2], **IDS)
    with pytest.raises(TypeError, match="video_grid_thw"):
        mcg_rope_index(ids, image_grid_thw=g, video_grid_thw=g.float(), **IDS)
    with pytest.raises(ValueError, match="attention_mask"):
        mcg_rope_index(ids, image_grid_thw=g, attention_mask=torch.ones(1, 3, dtype=torch.long), **IDS)
    with pytest.raises(TypeError, match="attention_mask"):
        mcg_rope_index(ids, image_grid_thw=g, attention_mask=torch.ones(ids.shape), **IDS)
    with pytest.raises(ValueError, match="modality_gap"):
        mcg_rope_index(ids, image_grid_thw=g, modality_gap=0, **IDS)
    with pytest.raises(ValueError, match="vision_stride"):
        mcg_rope_index(ids, image_grid_thw=g, vision_stride=0, **IDS)
    with pytest.raises(ValueError, match="spatial_merge_size"):
        mcg_rope_index(ids, image_grid_thw=g, **dict(IDS, spatial_merge_size=0))
    with pytest.raises(ValueError, match="must differ"):
        mcg_rope_index(ids, image_grid_thw=g, **dict(IDS, video_token_id=IMG))
    with pytest.raises(TypeError, match="image_token_id"):
        mcg_rope_index(ids, image_grid_thw=g, **dict(IDS, image_token_id=1.5))


# --------------------------------------------------------------------------------------------------
# Decoding positions


def test_decode_positions_follow_transformers_rule():
    ids, mask, grid, vgrid, _ = random_batch(4)
    _, deltas = mcg_rope_index(ids, image_grid_thw=grid, video_grid_thw=vgrid, attention_mask=mask, **IDS)
    S = ids.shape[1]
    # transformers, decoding with a cache of length S: arange(S, S + n) + rope_deltas on all three rows
    want = (torch.arange(S, S + 3).view(1, 1, -1) + deltas.view(1, -1, 1)).expand(3, -1, -1)
    assert torch.equal(mrope_decode_position_ids(S, deltas, num_tokens=3), want)
    assert torch.equal(mrope_decode_position_ids(torch.arange(S, S + 3), deltas), want)
    assert torch.equal(mrope_decode_position_ids(torch.arange(S, S + 3).expand(4, -1), deltas.view(-1)), want)


def test_decode_continues_after_largest_position():
    # an unpadded row: the first generated token sits at the prefill's largest position + 1
    row = text(2) + [VS] + [IMG] * 6 + [VE] + text(1) + [VS] + [VID] * 12 + [VE]
    ids = torch.tensor([row])
    pos, deltas = mcg_rope_index(ids, image_grid_thw=_grid((1, 4, 6)), video_grid_thw=_grid((3, 4, 4)), **IDS)
    nxt = mrope_decode_position_ids(ids.shape[1], deltas)
    assert nxt.shape == (3, 1, 1) and nxt.flatten().tolist() == [int(pos.max()) + 1] * 3


def test_decode_positions_errors():
    with pytest.raises(ValueError, match="rope_deltas"):
        mrope_decode_position_ids(3, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="rope_deltas"):
        mrope_decode_position_ids(3, torch.zeros(2, 1))
    with pytest.raises(ValueError, match="cache_position"):
        mrope_decode_position_ids(torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="cache_position"):
        mrope_decode_position_ids(-1, torch.zeros(2, 1, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# GPU: the on-device path, with at most one host sync


@pytest.mark.gpu
@pytest.mark.parametrize("grids_on", ["cpu", "cuda"])
@pytest.mark.parametrize("videos", ["plain", "interval", "split"])
def test_cuda_matches_host_with_one_sync(grids_on, videos):
    import warnings

    ids, mask, grid, vgrid, _ = random_batch(9, extra=2, p_video=0.4, split_frames=videos == "split")
    extra = {}
    if videos == "interval":
        extra["video_time_interval"] = random_intervals(len(vgrid))
    elif videos == "split":
        extra["split_video_frames"] = True
    want = mcg_rope_index(ids, image_grid_thw=grid, video_grid_thw=vgrid, attention_mask=mask, **IDS, **extra)
    extra = {k: v.to(grids_on) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
    args = (ids.cuda(), grid.to(grids_on), vgrid.to(grids_on), mask.cuda())
    mcg_rope_index(
        args[0], image_grid_thw=args[1], video_grid_thw=args[2], attention_mask=args[3], **IDS, **extra
    )  # warm
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = mcg_rope_index(
                args[0], image_grid_thw=args[1], video_grid_thw=args[2], attention_mask=args[3], **IDS, **extra
            )
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]
    assert got[0].is_cuda and torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    with pytest.raises(ValueError, match=r"1 image runs but image_grid_thw has 2 rows"):
        mcg_rope_index(_ids(T, VS, IMG, IMG, IMG, IMG, VE).cuda(), image_grid_thw=_grid((1, 4, 4), (1, 4, 4)), **IDS)
    if videos == "interval":  # a bad interval on the device is caught inside the one sync
        with pytest.raises(ValueError, match=r"video_time_interval\[0\] = nan"):
            mcg_rope_index(
                _ids(VS, VID, VE).cuda(),
                video_grid_thw=_grid((1, 2, 2)).to(grids_on),
                video_time_interval=torch.tensor([float("nan")], device="cuda"),
                **IDS,
            )
