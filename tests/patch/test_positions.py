"""MCG-RoPE gap 2 inside the model: the positions it uses are ``mcg_rope_index``'s, training equals the
stock model fed those positions, and decoding (generate, or a manual loop on rope_deltas) continues
from them, consistently with a full forward over the generated text."""

from __future__ import annotations

import copy
import inspect

import torch

from clinkd.patch import MCGRope, patch_qwen2_vl
from clinkd_kernels import mcg_rope_index
from tests.patch.compare import as_dtype, assert_close_model, compare_with_stock_fed, training_step
from tests.patch.tiny import (
    IMAGE,
    MIXED_ROWS,
    PAD,
    PAD_POSITION,
    VIDEO,
    VISION_END,
    VISION_START,
    make_batch,
    qwen2_vl_model,
    stock_deltas,
)

GAP2 = MCGRope(modality_gap=2, vision_stride=1)


def _mcg_positions(batch, gap=2):
    return mcg_rope_index(
        batch["input_ids"],
        image_grid_thw=batch.get("image_grid_thw"),
        attention_mask=batch["attention_mask"],
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        modality_gap=gap,
        pad_position=PAD_POSITION,
    )


def _record_positions(model):
    """Position ids of every language-model call, as the model passes them: list of [3|4, B, S]."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_forward_uses_mcg_positions_and_matches_stock_fed_them(fused_calls):
    stock = qwen2_vl_model().train()
    patched = patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=GAP2, backend="cpu")
    batch = make_batch(MIXED_ROWS, padding="left")
    want, deltas = _mcg_positions(batch)
    assert not torch.equal(want, _mcg_positions(batch, gap=1)[0])  # gap 2 does move positions here

    seen, handle = _record_positions(patched)
    out, grads = training_step(patched, batch, return_logits=True, use_cache=False)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], want)
    assert torch.equal(patched.model.rope_deltas, stock_deltas(deltas, batch["attention_mask"]))
    assert fused_calls == {"attention": 2, "loss": 1}

    # The stock model given the same positions explicitly is the reference (fp64) and baseline (fp32).
    compare_with_stock_fed(stock, out, grads, batch, want)


def test_generate_continues_from_mcg_positions():
    stock = qwen2_vl_model()
    patched = patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=GAP2, backend="cpu")
    batch = make_batch(MIXED_ROWS, padding="left")
    batch.pop("labels")
    prompt_pos, _ = _mcg_positions(batch)
    new = 4
    seen, handle = _record_positions(patched)
    gen = patched.generate(
        **batch,
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=PAD,
        output_logits=True,
        return_dict_in_generate=True,
        suppress_tokens=[IMAGE, VIDEO, VISION_START, VISION_END],
    )
    handle.remove()

    assert len(seen) == new
    assert torch.equal(seen[0][1:], prompt_pos)  # prefill: MCG-RoPE (rows t, h, w after the text row)
    last = prompt_pos.amax(dim=(0, 2))  # every prompt ends with text: its last position is the largest
    for step, pos in enumerate(seen[1:], start=1):
        assert pos.shape[-1] == 1
        assert torch.equal(pos[1:, :, 0], (last + step).expand(3, -1)), f"decoding step {step}"

    # Decoding with the cache (filled by the fused prefill with rotated keys) must agree with one full
    # forward over prompt + generated tokens, whose MCG-RoPE positions continue the same way.
    full = dict(
        input_ids=gen.sequences,
        attention_mask=torch.cat(
            [batch["attention_mask"], torch.ones(len(gen.sequences), new, dtype=torch.long)], dim=1
        ),
    )
    full_pos, _ = _mcg_positions({**full, "image_grid_thw": batch["image_grid_thw"]})
    assert torch.equal(full_pos[..., -new:-1], torch.stack([p[1:, :, 0] for p in seen[1:]], dim=-1))
    fed = dict(
        full,
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        mm_token_type_ids=(full["input_ids"] == IMAGE).long(),
        position_ids=full_pos,
    )
    with torch.no_grad():
        ref = copy.deepcopy(stock).double()(**as_dtype(fed, torch.float64), use_cache=False).logits
        base = stock(**fed, use_cache=False).logits
    S = batch["input_ids"].shape[1]
    got = torch.stack(gen.logits, dim=1)  # [B, new, V]: step i predicts token S + i from position S - 1 + i
    assert_close_model("decoding logits", got, ref[:, S - 1 : S - 1 + new], base[:, S - 1 : S - 1 + new])


def test_manual_decoding_uses_rope_deltas():
    """Without generate(): prefill with a cache, then step with neither position ids nor a mask; the
    model derives the step's positions from the cached rope_deltas (stock logic, our deltas)."""
    model = patch_qwen2_vl(qwen2_vl_model(), mcg_rope=GAP2, backend="cpu")
    batch = make_batch([[7, (1, 4, 6), 3], [1, (1, 4, 4), 4, (1, 4, 4), 1]])  # equal lengths: no padding
    assert bool(batch["attention_mask"].all())
    batch.pop("labels")
    prompt_pos, deltas = _mcg_positions(batch)
    seen, handle = _record_positions(model)
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        cache = out.cache if "cache" in out else out.past_key_values
        step = out.logits[:, -1:].argmax(-1)
        cache_kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        model(input_ids=step, use_cache=True, **{cache_kw: cache})
    handle.remove()
    assert torch.equal(model.model.rope_deltas, deltas)
    assert torch.equal(seen[0], prompt_pos)
    assert torch.equal(seen[1][:, :, 0], (prompt_pos.amax(dim=(0, 2)) + 1).expand(3, -1))
