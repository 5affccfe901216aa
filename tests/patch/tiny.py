"""Tiny random-weight Qwen2-VL, Qwen2.5-VL and Qwen3-VL models and multimodal batches for the patch
tests (no downloads).

Text decoder: hidden 256, 2 layers, 4 query / 2 KV heads (GQA), head_dim 64 (the smallest the fused
attention takes), mrope_section (8, 12, 12) = head_dim / 2 (Qwen3-VL: (12, 10, 10), interleaved).
Vision tower: depth 1, patch 2, temporal patch 1, merge 2, so an image of grid (1, h, w) patches
becomes h·w/4 placeholder tokens and a video of grid (t, h, w) t·h·w/4 (Qwen3-VL: t frames of h·w/4,
each after its timestamp text). On transformers 5.3-5.5 each model carries the upstream fix of its
vision positions (stock_fix.py: stock there positions multi-frame grids wrongly).
"""

from __future__ import annotations

import random

import torch

from tests.patch.stock_fix import with_fixed_vision_positions

VOCAB = 300
IMAGE, VIDEO, VISION_START, VISION_END = 290, 291, 292, 293
PAD, EOS = 0, 2
PATCH_DIM = 3 * 1 * 2 * 2  # channels · temporal patch · patch²


def _takes_token_types() -> bool:
    from clinkd.patch._compat import FAMILIES, takes_token_types

    return takes_token_types(FAMILIES[0])


TOKEN_TYPES = _takes_token_types()  # the installed transformers reads mm_token_type_ids (5.3+)


def _index_conventions():
    from transformers import Qwen2VLModel

    from clinkd.patch._compat import index_conventions

    return index_conventions(Qwen2VLModel)


CONVENTIONS = _index_conventions()  # padding value and rope_deltas of the installed get_rope_index
PAD_POSITION = CONVENTIONS.pad_position


def stock_deltas(deltas: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``mcg_rope_index``'s rope_deltas [B,1] (over the unpadded tokens) as the installed transformers
    counts them (5.0-5.1: over the padded length)."""
    if not CONVENTIONS.deltas_over_padded_length:
        return deltas
    return deltas + attention_mask.sum(1, keepdim=True) - attention_mask.shape[1]


def text_config(**overrides) -> dict:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=EOS,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[8, 12, 12]),
    )
    cfg.update(overrides)
    return cfg


def vision_config(hidden_size: int = 256) -> dict:
    return dict(
        depth=1,
        embed_dim=32,
        hidden_size=hidden_size,
        num_heads=2,
        patch_size=2,
        spatial_merge_size=2,
        temporal_patch_size=1,
        in_channels=3,
        mlp_ratio=2,
    )


def qwen2_vl_config(**text_overrides):
    from transformers import Qwen2VLConfig

    text = text_config(**text_overrides)
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision_config(text["hidden_size"]),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )


def qwen2_vl_model(dtype=torch.float32, init_std: float = 0.1, **text_overrides):
    """A random-weight Qwen2VLForConditionalGeneration in eval mode. ``init_std`` > HF's default 0.02
    spreads the logits, so greedy decoding does not hinge on near-ties."""
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration(qwen2_vl_config(**text_overrides))
    return with_fixed_vision_positions(_random_text_weights(model, init_std).to(dtype).eval())


def _random_text_weights(model, init_std: float):
    """Draw the language model's matrices from N(0, init_std²): wider than HF's 0.02, so greedy decoding
    does not hinge on near-ties (the vision tower keeps its initialisation)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "visual" not in name:
                p.normal_(0.0, init_std)
    return model


def _text(n: int) -> list[int]:
    return [random.randrange(3, 280) for _ in range(n)]


def _vision(grid, token: int) -> list[int]:
    t, h, w = grid
    return [VISION_START] + [token] * (t * h * w // 4) + [VISION_END]


def _video_frames(grid) -> list[int]:
    """Qwen3-VL's video layout: per frame, timestamp text ("<t seconds>", 3 tokens here), then the frame."""
    t, h, w = grid
    return [tok for _ in range(t) for tok in _text(3) + _vision((1, h, w), VIDEO)]


def make_batch(rows: list[list], *, padding: str = "right", dtype=torch.float32, frames: bool = False) -> dict:
    """rows: per sample a list of parts: an int n (n text tokens), a tuple (t, h, w) (an image grid) or
    ("video", t, h, w). Returns input_ids, attention_mask, mm_token_type_ids (where the installed
    transformers takes them), labels (the text tokens;
    padding and placeholders -100) and, when present, pixel_values/image_grid_thw and
    pixel_values_videos/video_grid_thw; padded on ``padding``. ``frames``: videos laid out frame by
    frame with timestamps (Qwen3-VL), else as one run (Qwen2-VL, Qwen2.5-VL)."""
    seqs, grids, video_grids = [], [], []
    for parts in rows:
        ids = []
        for part in parts:
            if isinstance(part, int):
                ids += _text(part)
            elif part[0] == "video":
                ids += _video_frames(part[1:]) if frames else _vision(part[1:], VIDEO)
                video_grids.append(part[1:])
            else:
                ids += _vision(part, IMAGE)
                grids.append(part)
        seqs.append(ids)
    longest = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), longest), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), longest, dtype=torch.long)
    for b, ids in enumerate(seqs):
        sl = slice(0, len(ids)) if padding == "right" else slice(longest - len(ids), longest)
        input_ids[b, sl] = torch.tensor(ids)
        mask[b, sl] = 1
    labels = input_ids.masked_fill((mask == 0) | (input_ids == IMAGE) | (input_ids == VIDEO), -100)
    types = (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()
    batch = dict(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=types, labels=labels)
    if not TOKEN_TYPES:  # as the processor of transformers < 5.3 returns it: models there take no types
        del batch["mm_token_type_ids"]
    for found, key, pixels in (
        (grids, "image_grid_thw", "pixel_values"),
        (video_grids, "video_grid_thw", "pixel_values_videos"),
    ):
        if found:
            grid = torch.tensor(found)
            batch[key] = grid
            batch[pixels] = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, dtype=dtype)
    return batch


# Batches every equivalence test runs: images (one and two per row), text-only rows, odd lengths.
MIXED_ROWS = [[3, (1, 4, 6), 5], [7], [2, (1, 4, 4), 3, (1, 6, 4), 4]]


def qwen2_5_vl_model(dtype=torch.float32, init_std: float = 0.1, **text_overrides):
    """A random-weight Qwen2_5_VLForConditionalGeneration (same text decoder as ``qwen2_vl_model``)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = text_config(**text_overrides)
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=2,
        spatial_merge_size=2,
        temporal_patch_size=1,
        in_channels=3,
        window_size=8,
        out_hidden_size=text["hidden_size"],
        fullatt_block_indexes=[0],
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    return with_fixed_vision_positions(_random_text_weights(model, init_std).to(dtype).eval())


def qwen3_vl_model(dtype=torch.float32, init_std: float = 0.1, **text_overrides):
    """A random-weight Qwen3VLForConditionalGeneration: the same decoder sizes with head_dim 64 and
    interleaved sections (12, 10, 10), per-head q/k RMSNorm; a one-block vision tower with one
    deepstack feature."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[12, 10, 10], mrope_interleaved=True)
    text = text_config(**{"head_dim": 64, "rope_parameters": rope, **text_overrides})
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=2,
        spatial_merge_size=2,
        temporal_patch_size=1,
        in_channels=3,
        out_hidden_size=text["hidden_size"],
        num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    model = Qwen3VLForConditionalGeneration(config)
    return with_fixed_vision_positions(_random_text_weights(model, init_std).to(dtype).eval())


MODELS = {"Qwen2-VL": qwen2_vl_model, "Qwen2.5-VL": qwen2_5_vl_model, "Qwen3-VL": qwen3_vl_model}
