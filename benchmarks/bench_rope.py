"""MCG-RoPE indices and the M-RoPE rotation against transformers' Qwen2-VL code.

Indices: ``mcg_rope_index`` vs ``Qwen2VLModel.get_rope_index`` (a Python loop over each row's tokens)
at B=8, S=2048, one 448x448 image per row (grid (1, 32, 32) → 256 tokens after the 2x2 merge); and vs
``Qwen3VLModel.get_rope_index`` on Qwen3-VL's video layout (8 frames of 256 tokens per row, each after
its timestamp text), checked equal first; on CPU (NumPy path) and, with a GPU, on CUDA tensors
(on-device path, one host sync).
Floor: the token ids (and mask) read once and the [3, B, S] int64 positions written once, at the
measured copy bandwidth; the work is a few integer passes over 16k tokens, so the ratio to
transformers is the figure of merit and the floor says how far from free the call is.

Rotation: ``apply_mrope`` (angles computed in-kernel) vs transformers' Qwen2-VL path (the rotary
module builds cos/sin [3,B,S,D/2] → [B,S,D] in fp32, casts them to the activation dtype, then
``q·cos + rotate_half(q)·sin``) and the clarity-first reference. Floor: q and k read once and
written once (+ the positions), at the measured copy bandwidth of the device.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.conftest import sync
from benchmarks.floors import memory_floor_s, record
from clinkd_kernels import apply_mrope, mcg_rope_index
from clinkd_kernels.rope import apply_mrope_reference

IMG, VID, VS, VE = 151655, 151656, 151652, 151653  # Qwen2-VL's ids
SECTIONS = [16, 24, 24]


# --------------------------------------------------------------------------------------------------
# Indices


@functools.cache
def _hf_model():
    import transformers
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
            vocab_size=160000,
        ),
        vision_config=dict(depth=1, embed_dim=8, hidden_size=16, num_heads=2, spatial_merge_size=2),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
    )
    return Qwen2VLModel(config).eval()


def _index_batch(B=8, S=2048, padded=False):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150000, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    for b in range(B):
        pad = int(torch.randint(0, 300, (1,), generator=g)) if padded else 0
        at = pad + 5 + int(torch.randint(0, 1000, (1,), generator=g))
        ids[b, at - 1], ids[b, at : at + 256], ids[b, at + 256] = VS, IMG, VE
        mask[b, :pad] = 0  # left padding
    grid = torch.tensor([[1, 32, 32]] * B)
    return ids, (mask if padded else None), grid


@pytest.mark.parametrize("padded", [False, True], ids=["no-pad", "left-pad"])
@pytest.mark.parametrize("impl", ["clinkd", "clinkd-gap2", "transformers"])
def test_rope_index(benchmark, device, impl, padded):
    ids, mask, grid = (None if t is None else t.to(device) for t in _index_batch(padded=padded))
    pad = "left-pad" if padded else "no-pad"
    benchmark.group = f"mcg_rope_index {device} B=8 S=2048 1 image/row {pad}"
    moved = ids.numel() * 8 * (1 + (mask is not None) + 3)
    record(
        benchmark,
        floor_s=memory_floor_s(moved, device),
        bytes=moved,
        op="mcg_rope_index",
        impl=impl,
        device=device,
        shape="B=8,S=2048,grid=(1,32,32)",
    )
    if impl == "transformers":
        model = _hf_model()
        types = (ids == IMG).int()  # the processor's mm_token_type_ids, not timed
        fn = functools.partial(model.get_rope_index, ids, types, image_grid_thw=grid, attention_mask=mask)
        rounds = 30
    else:
        gap = 2 if impl == "clinkd-gap2" else 1
        fn = functools.partial(
            mcg_rope_index,
            ids,
            image_grid_thw=grid,
            attention_mask=mask,
            image_token_id=IMG,
            video_token_id=VID,
            vision_start_token_id=VS,
            modality_gap=gap,
        )
        rounds = 300

    def run():
        fn()
        sync(device)

    with torch.no_grad():
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=5)


@functools.cache
def _hf_qwen3_vl_model():
    import transformers
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    transformers.logging.set_verbosity_error()
    config = Qwen3VLConfig(
        text_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            vocab_size=160000,
            rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[2, 1, 1], mrope_interleaved=True),
        ),
        vision_config=dict(
            depth=1,
            hidden_size=8,
            intermediate_size=16,
            num_heads=2,
            spatial_merge_size=2,
            out_hidden_size=16,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
    )
    return Qwen3VLModel(config).eval()


def _qwen3_vl_video_batch(B=4, frames=8, side=32):
    """Qwen3-VL's video layout: per row some text, then ``frames`` frames, each "<t seconds>" (4 text
    tokens), vision_start, (side/2)² placeholders, vision_end; then text. Left padding on odd rows."""
    g = torch.Generator().manual_seed(0)
    per_frame = (side // 2) ** 2
    rows = []
    for b in range(B):
        row = torch.randint(0, 150000, (20 + b,), generator=g).tolist()
        for _ in range(frames):
            row += torch.randint(0, 150000, (4,), generator=g).tolist() + [VS] + [VID] * per_frame + [VE]
        rows.append(row + torch.randint(0, 150000, (30,), generator=g).tolist())
    S = max(len(r) for r in rows)
    ids, mask = torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, S - len(row) :], mask[b, S - len(row) :] = torch.tensor(row), 1
    return ids, mask, torch.tensor([[frames, side, side]] * B)


@pytest.mark.parametrize("impl", ["clinkd", "transformers"])
def test_rope_index_qwen3_vl_video(benchmark, device, impl):
    """Qwen3-VL: one grid per frame, timestamp text between frames (``split_video_frames``), gap 1."""
    ids, mask, grid = (t.to(device) for t in _qwen3_vl_video_batch())
    B, S = ids.shape
    benchmark.group = f"mcg_rope_index {device} Qwen3-VL B={B} S={S} 8-frame video/row left-pad"
    moved = ids.numel() * 8 * (1 + 1 + 3)
    record(
        benchmark,
        floor_s=memory_floor_s(moved, device),
        bytes=moved,
        op="mcg_rope_index",
        impl=impl,
        device=device,
        shape=f"B={B},S={S},video=(8,32,32) per frame",
    )
    model = _hf_qwen3_vl_model()
    types = 2 * (ids == VID).int()
    stock = functools.partial(model.get_rope_index, ids, types, video_grid_thw=grid, attention_mask=mask)
    ours = functools.partial(
        mcg_rope_index,
        ids,
        video_grid_thw=grid,
        attention_mask=mask,
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
        modality_gap=1,
        pad_position=0,
        split_video_frames=True,
    )
    with torch.no_grad():
        want, got = stock(), ours()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), "not the stock Qwen3-VL positions"
    fn, rounds = (stock, 20) if impl == "transformers" else (ours, 300)

    def run():
        fn()
        sync(device)

    with torch.no_grad():
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=5)


# --------------------------------------------------------------------------------------------------
# Rotation


@functools.cache
def _hf_rotary(head_dim: int):
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    cfg = Qwen2VLConfig(
        text_config=dict(
            hidden_size=28 * head_dim,
            num_attention_heads=28,
            num_key_value_heads=4,
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=SECTIONS),
        )
    )
    return Qwen2VLRotaryEmbedding(cfg.text_config)


def transformers_mrope(q, k, position_ids, rotary):
    """Qwen2-VL's rotation as transformers runs it, in our [B,S,H,D] layout."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

    cos, sin = rotary(q, position_ids)  # [B,S,D] in q's dtype
    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)


ROT_SHAPES = {"cpu": [(1, 1024, torch.float32)], "cuda": [(2, 2048, torch.bfloat16), (2, 4096, torch.bfloat16)]}


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape_index", [0, 1])
@pytest.mark.parametrize("impl", ["clinkd", "transformers", "reference"])
def test_apply_mrope(benchmark, device, impl, shape_index, backward):
    if shape_index >= len(ROT_SHAPES[device]):
        pytest.skip("no such shape on this device")
    if device == "cpu" and backward:
        pytest.skip("CPU: forward only (keeps the CPU suite short)")
    B, S, dtype = ROT_SHAPES[device][shape_index]
    Hq, Hkv, D = 28, 4, 128
    q = torch.randn(B, S, Hq, D, device=device, dtype=dtype, requires_grad=backward)
    k = torch.randn(B, S, Hkv, D, device=device, dtype=dtype, requires_grad=backward)
    pos = torch.randint(0, 4096, (3, B, S), device=device)
    rotary = _hf_rotary(D).to(device)
    inv_freq = rotary.inv_freq.float()
    fn = {
        "clinkd": lambda: apply_mrope(q, k, pos, inv_freq, SECTIONS),
        "transformers": lambda: transformers_mrope(q, k, pos, rotary),
        "reference": lambda: apply_mrope_reference(q, k, pos, inv_freq, SECTIONS),
    }[impl]
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def run():
        out = fn()
        if backward:
            torch.autograd.backward(out, (gq, gk))
        sync(device)

    moved = 2 * (q.numel() + k.numel()) * q.element_size() + pos.numel() * pos.element_size()
    if backward:
        moved *= 2
    name = f"apply_mrope {device} B={B} S={S} Hq={Hq} Hkv={Hkv} D={D} {str(dtype).replace('torch.', '')}"
    benchmark.group = name + (" fwd+bwd" if backward else " fwd")
    record(
        benchmark,
        floor_s=memory_floor_s(moved, device),
        bytes=moved,
        op="apply_mrope",
        impl=impl,
        device=device,
        shape=f"B={B},S={S},Hq={Hq},Hkv={Hkv},D={D}",
        backward=backward,
    )
    benchmark.pedantic(run, rounds=15 if device == "cpu" else 30, warmup_rounds=2, iterations=1)
