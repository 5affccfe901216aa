"""Every Qwen-VL family the patch serves (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), with images and videos:

* positions at gap 1 equal the family's stock ``get_rope_index`` (Qwen2.5-VL's timed video positions,
  Qwen3-VL's per-frame grids with timestamp text between frames);
* a patched training step (loss, logits, every gradient) equals the stock model under the float64
  rule, on the CPU path and on the Triton path under the interpreter;
* greedy ``generate()`` gives the stock model's tokens;
* at gap 2 the patched model equals the stock model fed ``mcg_rope_index``'s positions (same rule).

Batches: left padding, several images and videos per row, a text-only row, a video with more frames
than its spatial extent (where transformers 5.x's rule for the next segment matters).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from clinkd.patch import MCGRope, patch_qwen2_vl
from clinkd.patch._compat import video_seconds_truncated
from clinkd_kernels import mcg_rope_index
from tests.patch.compare import compare_with_stock, compare_with_stock_fed, training_step
from tests.patch.tiny import CONVENTIONS, EOS, IMAGE, MODELS, PAD, VIDEO, VISION_END, VISION_START, make_batch

GAP1 = MCGRope(modality_gap=1, vision_stride=1)
GAP2 = MCGRope(modality_gap=2, vision_stride=1)
FAMILIES = list(MODELS)
# Videos with more frames than their spatial extent (3 frames of 2x2 merged tokens): where the
# transformers 4 / 5.3+ rules for the segment after a video differ.
ROWS = [[3, (1, 4, 6), 5, ("video", 2, 4, 4), 2], [7], [2, ("video", 3, 4, 4), 3, (1, 4, 4), 4]]
SMALL_ROWS = [[2, ("video", 3, 4, 4), 1, (1, 4, 6), 2], [5]]  # for the interpreter
# transformers < 5.3 starts the text after a video at its last frame, and the patch refuses a video whose
# last frame lies beyond its spatial extent there (test_older_rule_refuses_long_videos): videos that fit.
LEGACY = CONVENTIONS.restart_after_last_frame
if LEGACY:
    ROWS = [[3, (1, 4, 6), 5, ("video", 2, 12, 8), 2], [7], [2, ("video", 2, 4, 12), 3, (1, 4, 4), 4]]
    SMALL_ROWS = [[2, ("video", 2, 4, 12), 1, (1, 4, 6), 2], [5]]
SUPPRESSED = [IMAGE, VIDEO, VISION_START, VISION_END, EOS]
SECONDS = torch.tensor([0.5, 1.7])  # Qwen2.5-VL: seconds per temporal grid of each video


def _batch(family: str, rows=ROWS, *, padding: str = "left") -> dict:
    batch = make_batch(rows, padding=padding, frames=family == "Qwen3-VL")
    if family == "Qwen2.5-VL":
        batch["second_per_grid_ts"] = SECONDS[: batch["video_grid_thw"].shape[0]]
    return batch


def _stock_deltas_misplaced(model) -> bool:
    """transformers 5.2: the per-row index of 5.0-5.1 beside 5.2's consumer of rope_deltas."""
    source = inspect.getsource(type(model.model).get_rope_index)
    return "len(total_input_ids[i])" in source and not CONVENTIONS.deltas_over_padded_length


def _rule(family: str, model, batch: dict) -> dict:
    """The family's video keywords of ``mcg_rope_index``, written from the transformers sources."""
    if family == "Qwen2.5-VL":  # releases before 5.18 truncate the seconds (proven against stock at gap 1)
        seconds = batch["second_per_grid_ts"]
        if video_seconds_truncated(type(model.model).get_rope_index):
            seconds = seconds.trunc()
        return {"video_time_interval": model.config.vision_config.tokens_per_second * seconds}
    if family == "Qwen3-VL":
        return {"split_video_frames": True}
    return {}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_positions_at_gap_1_equal_the_stock_rope_index(family, padding):
    stock = MODELS[family]()
    patched = patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=GAP1, backend="cpu")
    batch = _batch(family, padding=padding)
    keys = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask")
    args = {k: batch[k] for k in keys if k in batch}  # transformers < 5.3 reads no mm_token_type_ids
    if family == "Qwen2.5-VL":
        args["second_per_grid_ts"] = batch["second_per_grid_ts"]
    want, want_deltas = stock.model.get_rope_index(**args)
    got, deltas = patched.model.get_rope_index(**args)
    keep = batch["attention_mask"].bool()
    assert torch.equal(got[:, keep], want[:, keep])
    floats = patched.model.get_rope_index(**{**args, "attention_mask": args["attention_mask"].float()})
    assert all(torch.equal(a, b) for a, b in zip(floats, (got, deltas)))  # a float mask, as stock takes it
    # rope_deltas as the installed release's decoding continues from them, derived from stock's positions.
    # 5.2's own get_rope_index writes deltas its decoding misplaces (_compat.index_conventions): only
    # there are stock's deltas not the reference.
    count = batch["attention_mask"].shape[1] if CONVENTIONS.deltas_over_padded_length else keep.sum(1, keepdim=True)
    top = want.masked_fill(~keep, -1).amax(dim=(0, 2)).unsqueeze(1)
    assert torch.equal(deltas, top + 1 - count)
    if not _stock_deltas_misplaced(stock):
        assert torch.equal(deltas, want_deltas)
    assert torch.equal(got, want)  # padding too: both write 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_training_step_matches_stock(family, backend, fused_calls, request):
    if backend == "triton":
        request.getfixturevalue("interpreter")
    stock = MODELS[family]().train()
    patched = patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=GAP1, backend=backend)
    batch = _batch(family, ROWS if backend == "cpu" else SMALL_ROWS)
    compare_with_stock(stock, patched, batch, keep=batch["attention_mask"].bool(), use_cache=False)
    assert fused_calls == {"attention": 2, "loss": 1}  # 2 layers, one loss: the fused path ran


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_greedy_generate_matches_stock(family, backend, fused_calls, request):
    if backend == "triton":
        request.getfixturevalue("interpreter")
    stock = MODELS[family]()
    patched = patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=GAP1, backend=backend)
    batch = _batch(family, ROWS if backend == "cpu" else SMALL_ROWS)
    batch.pop("labels")
    kwargs = dict(do_sample=False, max_new_tokens=6, pad_token_id=PAD, suppress_tokens=SUPPRESSED)
    want = stock.generate(**batch, **kwargs)
    got = patched.generate(**batch, **kwargs)
    assert torch.equal(got, want)
    assert fused_calls["attention"] == 2  # the prefill ran on the fused kernel (decoding: the stock layer)


@pytest.mark.parametrize("family", FAMILIES)
def test_gap_2_equals_stock_fed_the_family_rule(family, fused_calls):
    stock = MODELS[family]().train()
    patched = patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=GAP2, backend="cpu")
    batch = _batch(family)
    want, _ = mcg_rope_index(
        batch["input_ids"],
        image_grid_thw=batch["image_grid_thw"],
        video_grid_thw=batch["video_grid_thw"],
        attention_mask=batch["attention_mask"],
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        modality_gap=2,
        pad_position=CONVENTIONS.pad_position,
        **_rule(family, stock, batch),
    )
    gap1, _ = stock.model.get_rope_index(
        **{
            k: batch[k]
            for k in ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask")
            if k in batch
        }
    )
    assert not torch.equal(want, gap1)  # gap 2 moves positions here

    out, grads = training_step(patched, batch, return_logits=True, use_cache=False)
    assert fused_calls == {"attention": 2, "loss": 1}
    compare_with_stock_fed(stock, out, grads, batch, want)


@pytest.mark.skipif(not LEGACY, reason="transformers 5.3+ positions after a video's spatial extent, as clinkd")
@pytest.mark.parametrize("family", ["Qwen2-VL", "Qwen2.5-VL"])
def test_older_rule_refuses_long_videos(family):
    """Where stock would place the text after a video from its last frame and clinkd's index from its
    spatial extent, the patched model refuses that video by name instead of positioning it otherwise."""
    patched = patch_qwen2_vl(MODELS[family](), mcg_rope=GAP1, backend="cpu")
    batch = _batch(family, [[2, ("video", 3, 4, 4), 2]])
    if family == "Qwen2.5-VL":
        batch["second_per_grid_ts"] = torch.tensor([2.0])  # frames 0, 2·tokens_per_second, ...
    with pytest.raises(ValueError, match=r"video 0 \(grid 3x4x4\): transformers .* from its last frame"):
        patched(**batch)
