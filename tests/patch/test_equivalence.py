"""Patched vs stock Qwen2-VL with stock positions (MCG-RoPE gap 1): same loss, logits, gradients and
greedy tokens. Reference: the stock model in float64; baseline: the stock model in float32 (§4 rule)."""

from __future__ import annotations

import copy

import pytest
import torch

from clinkd.patch import MCGRope, patch_qwen2_vl
from clinkd_kernels import mcg_rope_index
from tests.patch.compare import as_dtype, compare_with_stock
from tests.patch.tiny import IMAGE, MIXED_ROWS, PAD, make_batch, qwen2_vl_model

GAP1 = MCGRope(modality_gap=1, vision_stride=1)


# use_cache=None is the config default (True): training then prefills a cache, which the fused path fills too.
@pytest.mark.parametrize(
    "backend,padding,use_cache",
    [
        ("cpu", "right", False),
        ("cpu", "left", False),
        ("cpu", "right", None),
        ("cpu", "left", None),
        ("torch", "right", False),
        ("torch", "left", False),
    ],
)
def test_training_step_matches_stock(backend, padding, use_cache, fused_calls):
    stock = qwen2_vl_model().train()
    patched = patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=GAP1, backend=backend)
    batch = make_batch(MIXED_ROWS, padding=padding)
    # Padded query rows have no defined output (the fused kernel writes 0): compare real tokens only.
    compare_with_stock(stock, patched, batch, keep=batch["attention_mask"].bool(), use_cache=use_cache)
    assert fused_calls == {"attention": 2, "loss": 1}  # 2 layers, one loss: the fused path ran


def test_training_step_matches_stock_triton_interpreter(fused_calls):
    stock = qwen2_vl_model().train()
    patched = patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=GAP1, backend="triton")
    batch = make_batch([[2, (1, 4, 6), 3], [5]], padding="left")
    compare_with_stock(stock, patched, batch, keep=batch["attention_mask"].bool(), use_cache=False)
    assert fused_calls == {"attention": 2, "loss": 1}


def _packed_batch(parts_per_sequence):
    """One row holding several sequences, described (as transformers does) by 4-row position ids whose
    text row restarts at 0, and no attention mask. First labels of each sequence are -100."""
    pieces = [make_batch([parts]) for parts in parts_per_sequence]
    pos = []
    for piece in pieces:
        p3, _ = mcg_rope_index(
            piece["input_ids"],
            image_grid_thw=piece.get("image_grid_thw"),
            image_token_id=IMAGE,
            video_token_id=IMAGE + 1,
            modality_gap=1,
        )
        text = torch.arange(piece["input_ids"].shape[1]).view(1, 1, -1)
        pos.append(torch.cat([text, p3]))
        piece["labels"][:, 0] = -100
    batch = {
        k: torch.cat([p[k] for p in pieces], dim=1)
        for k in ("input_ids", "mm_token_type_ids", "labels")
        if k in pieces[0]
    }
    grids = [p["image_grid_thw"] for p in pieces if "image_grid_thw" in p]
    batch["image_grid_thw"] = torch.cat(grids)
    batch["pixel_values"] = torch.cat([p["pixel_values"] for p in pieces if "pixel_values" in p])
    batch["position_ids"] = torch.cat(pos, dim=2)
    return batch


@pytest.mark.parametrize("described_by", ["position_ids", "cu_seq_lens"])
def test_packed_batch_matches_stock(described_by, fused_calls):
    stock = qwen2_vl_model().train()
    patched = patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=GAP1, backend="cpu")
    batch = _packed_batch([[3, (1, 4, 6), 4], [6], [(1, 4, 4), 5]])
    if described_by == "cu_seq_lens":  # what flash-attention collators pass along (position ids stay too)
        starts = (batch["position_ids"][0, 0] == 0).nonzero().squeeze(1)
        cu = torch.cat([starts, torch.tensor([batch["input_ids"].shape[1]])]).int()
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    compare_with_stock(stock, patched, batch, use_cache=False)
    assert fused_calls == {"attention": 2, "loss": 1}


def test_packed_boundaries_found_once_per_forward(monkeypatch):
    """Both layers get the same position ids: the sequence boundaries (a nonzero pass, a host sync on a
    GPU) are found by the first layer and reused by the second."""
    import clinkd.patch.attention as attention

    calls, real = [], attention._packed_cu_seqlens
    monkeypatch.setattr(attention, "_packed_cu_seqlens", lambda *a: calls.append(1) or real(*a))
    patched = patch_qwen2_vl(qwen2_vl_model().train(), mcg_rope=GAP1, backend="cpu")
    patched(**_packed_batch([[3, (1, 4, 6), 4], [6]]), use_cache=False).loss.backward()
    assert len(calls) == 1 and patched.config.text_config.num_hidden_layers == 2


def test_packing_changes_the_result():
    """The packed test above can fail: attending across the packed sequences gives another loss."""
    model = patch_qwen2_vl(qwen2_vl_model(), mcg_rope=GAP1, backend="cpu")
    batch = _packed_batch([[3, (1, 4, 6), 4], [6], [(1, 4, 4), 5]])
    packed = model(**batch, use_cache=False).loss
    batch["position_ids"][0] = torch.arange(batch["input_ids"].shape[1])  # one long sequence
    assert (model(**batch, use_cache=False).loss - packed).abs() > 1e-4


def test_video_rows_match_stock(fused_calls):
    """Videos whose frame count t ≤ max(h, w)/2: there stock Qwen2-VL and MCG-RoPE gap 1 agree (for longer
    videos stock starts the next text at base + max(h, w)/2, inside the video's t range; MCG-RoPE does not)."""
    stock = qwen2_vl_model().train()
    patched = patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=GAP1, backend="cpu")
    batch = make_batch([[3, ("video", 2, 4, 4), 4], [2, (1, 4, 6), 3, ("video", 2, 6, 4), 2]], padding="left")
    compare_with_stock(stock, patched, batch, keep=batch["attention_mask"].bool(), use_cache=False)
    assert fused_calls == {"attention": 2, "loss": 1}


def test_greedy_generate_matches_stock(fused_calls):
    stock = qwen2_vl_model()
    patched = patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=GAP1, backend="cpu")
    batch = make_batch(MIXED_ROWS, padding="left")
    batch.pop("labels")
    want = stock.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    got = patched.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert torch.equal(got, want)
    assert fused_calls["attention"] == 2  # the prefill ran fused; the 5 decoding steps the stock layer


def test_qwen2_5_vl_images_match_stock(fused_calls):
    from tests.patch.tiny import qwen2_5_vl_model

    stock = qwen2_5_vl_model().train()
    patched = patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=GAP1, backend="cpu")
    batch = make_batch([[3, (1, 4, 6), 5], [7]], padding="right")
    compare_with_stock(stock, patched, batch, keep=batch["attention_mask"].bool(), use_cache=False)
    assert fused_calls == {"attention": 2, "loss": 1}


def test_gradient_checkpointing_matches_stock(fused_calls):
    stock = qwen2_vl_model().train()
    enable = getattr(stock, "activation_checkpointing_enable", None) or stock.gradient_checkpointing_enable
    enable()
    patched = patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=GAP1, backend="cpu")
    batch = make_batch(MIXED_ROWS, padding="left")
    compare_with_stock(stock, patched, batch, keep=batch["attention_mask"].bool(), use_cache=False)
    assert fused_calls["attention"] >= 2  # recomputation in backward runs the fused layer again


@pytest.mark.gpu
@pytest.mark.parametrize("padding", ["right", "left"])
def test_bf16_cuda_training_step_matches_stock(padding, fused_calls):
    """The Triton kernels on a GPU in bf16 (the interpreter cannot run bf16 dot products)."""
    stock = qwen2_vl_model(dtype=torch.bfloat16).cuda().train()
    patched = patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=GAP1, backend="triton")
    batch = as_dtype(make_batch(MIXED_ROWS, padding=padding), torch.bfloat16, "cuda")
    compare_with_stock(stock, patched, batch, keep=batch["attention_mask"].bool(), use_cache=False)
    assert fused_calls == {"attention": 2, "loss": 1}


@pytest.mark.gpu
def test_bf16_cuda_generate_runs_on_the_fused_prefill(fused_calls):
    model = patch_qwen2_vl(qwen2_vl_model(dtype=torch.bfloat16).cuda(), backend="triton")
    batch = as_dtype(make_batch(MIXED_ROWS, padding="left"), torch.bfloat16, "cuda")
    batch.pop("labels")
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    assert out.shape == (3, batch["input_ids"].shape[1] + 4) and fused_calls["attention"] == 2
