"""Positions on every path a user reaches without passing ``position_ids``: ``generate()`` (prefill, each
decoding step, beams, a continuation from the cache) and ``forward()``, with inputs built by hand and
no ``mm_token_type_ids``. The positions the language model receives must be ``mcg_rope_index``'s over
the whole sequence, and greedy decoding with the cache must equal full forwards without one.

Positions are compared exactly on the fused kernels (fp32). Token-for-token comparisons run the model
in float64 on the stock attention layer (the positions logic is the same; the rotation kernel takes
fp32/fp16/bf16 only), so no greedy step can turn on a rounding tie.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from clinkd.patch import MCGRope, patch_qwen2_vl
from clinkd_kernels import mcg_rope_index
from tests.patch.tiny import (
    EOS,
    IMAGE,
    PAD,
    PAD_POSITION,
    TOKEN_TYPES,
    VIDEO,
    VISION_END,
    VISION_START,
    make_batch,
    qwen2_5_vl_model,
    qwen2_vl_model,
    stock_deltas,
)

# Left padding, two images in a row, a text-only row, images of different grids.
ROWS = [[3, (1, 4, 6), 5], [7], [2, (1, 4, 4), 3, (1, 6, 4), 4], [1, (1, 4, 4), (1, 4, 8), 2]]
# Never generated: vision tokens (the prompt's runs stay the only ones) and EOS (every row takes every step).
SUPPRESSED = [IMAGE, VIDEO, VISION_START, VISION_END, EOS]
NEW = 8
# transformers < 5.3 has no mm_token_type_ids (get_rope_index reads the placeholder ids itself): the
# tests of completing and checking them apply from 5.3 on.
with_token_types = pytest.mark.skipif(not TOKEN_TYPES, reason="transformers < 5.3 takes no mm_token_type_ids")


def _model(gap: int, family=qwen2_vl_model, *, exact: bool = False):
    """Patched with MCG-RoPE gap ``gap``: fp32 on the fused kernels, or (``exact``) float64 on stock attention."""
    if exact:
        return patch_qwen2_vl(
            family(dtype=torch.float64), mcg_rope=MCGRope(modality_gap=gap), attention=False, backend="cpu"
        )
    return patch_qwen2_vl(family(), mcg_rope=MCGRope(modality_gap=gap), backend="cpu")


def _prompt(rows=ROWS, dtype=torch.float32) -> dict:
    """A left-padded batch as a user builds it by hand: ids, mask, pixels, grids; no mm_token_type_ids."""
    batch = make_batch(rows, padding="left", dtype=dtype)
    for key in ("labels", "mm_token_type_ids"):
        batch.pop(key, None)
    return batch


def _index(ids, mask, grids, gap):
    return mcg_rope_index(
        ids,
        image_grid_thw=grids,
        attention_mask=mask,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        modality_gap=gap,
        pad_position=PAD_POSITION,
    )


def _record_positions(model):
    """(t, h, w) position ids [3, B, S] of every language-model call. transformers passes [4, B, S] (text
    row first), [3, B, S], or [1, B, S] (a text continuation: the same on all three rows)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["position_ids"][-3:].expand(3, -1, -1).clone())

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def _greedy_without_cache(model, batch: dict, steps: int, gap: int) -> torch.Tensor:
    """``steps`` greedy tokens, each from a full forward over prompt + tokens so far without a cache, fed
    ``mcg_rope_index``'s positions explicitly (independent of how the model finds them): [B, S+steps]."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    vision = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    for _ in range(steps):
        positions, _ = _index(ids, mask, batch["image_grid_thw"], gap)
        with torch.no_grad():
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **vision
            ).logits[:, -1]
        logits[:, SUPPRESSED] = -torch.inf
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def _generate(model, batch, **kwargs):
    return model.generate(**batch, do_sample=False, pad_token_id=PAD, suppress_tokens=SUPPRESSED, **kwargs)


@pytest.mark.parametrize("gap", [1, 2])
def test_generate_positions_at_prefill_and_every_step(gap):
    model = _model(gap)
    batch = _prompt()
    S = batch["input_ids"].shape[1]
    seen, handle = _record_positions(model)
    sequences = _generate(model, batch, max_new_tokens=NEW)
    handle.remove()

    # The positions of the whole generated sequence, as mcg_rope_index gives them (and training uses).
    mask = torch.cat([batch["attention_mask"], torch.ones(len(sequences), NEW, dtype=torch.long)], dim=1)
    want, deltas = _index(sequences, mask, batch["image_grid_thw"], gap)
    assert len(seen) == NEW
    keep = batch["attention_mask"].bool()
    assert torch.equal(seen[0][:, keep], want[:, :, :S][:, keep]), "prefill positions"
    for step in range(1, NEW):
        assert torch.equal(seen[step][:, :, 0], want[:, :, S + step - 1]), f"decoding step {step}"
    # rope_deltas: what a manual decoding loop continues from (largest prompt position + 1 - tokens).
    _, prompt_deltas = _index(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], gap)
    assert torch.equal(model.model.rope_deltas, stock_deltas(prompt_deltas, batch["attention_mask"]))
    assert torch.equal(deltas, prompt_deltas)  # generated text continues by +1: the deltas do not move


@pytest.mark.parametrize("gap", [1, 2])
def test_greedy_generate_equals_full_forward_argmax(gap):
    model = _model(gap, exact=True)
    batch = _prompt(dtype=torch.float64)
    assert torch.equal(_generate(model, batch, max_new_tokens=NEW), _greedy_without_cache(model, batch, NEW, gap))


@with_token_types
@pytest.mark.parametrize("gap", [1, 2])
def test_forward_without_mm_token_type_ids_equals_forward_with_them(gap):
    model = _model(gap).train()
    batch = make_batch(ROWS, padding="right")
    types = batch.pop("mm_token_type_ids")
    seen, handle = _record_positions(model)
    without = model(**batch, use_cache=False).loss
    with_types = model(**batch, mm_token_type_ids=types, use_cache=False).loss
    handle.remove()
    want, _ = _index(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], gap)
    keep = batch["attention_mask"].bool()
    for pos in seen:
        assert torch.equal(pos[:, keep], want[:, keep])
    assert torch.equal(without, with_types)


def test_qwen2_5_vl_forward_and_generate_without_mm_token_type_ids():
    """Qwen2.5-VL's stock forward gives 1-D positions without the types (no error): the patch must not."""
    model = _model(2, family=qwen2_5_vl_model, exact=True)
    batch = _prompt(ROWS[:3], dtype=torch.float64)
    want, _ = _index(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], 2)
    keep = batch["attention_mask"].bool()
    seen, handle = _record_positions(model)
    with torch.no_grad():
        model(**batch, use_cache=False)
    handle.remove()
    assert torch.equal(seen[0][:, keep], want[:, keep])
    assert torch.equal(_generate(model, batch, max_new_tokens=4), _greedy_without_cache(model, batch, 4, 2))


def test_beams_and_return_sequences_keep_each_rows_positions():
    """num_beams / num_return_sequences repeat every row: each copy gets its own row's positions."""
    model = _model(2)
    batch = _prompt()
    S = batch["input_ids"].shape[1]
    want, _ = _index(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], 2)
    last = want.amax(dim=(0, 2))  # every prompt ends with text: its last position is its largest
    keep = batch["attention_mask"].bool().repeat_interleave(2, dim=0)
    seen, handle = _record_positions(model)
    out = _generate(model, batch, max_new_tokens=3, num_beams=2, num_return_sequences=2)
    handle.remove()
    assert out.shape == (2 * len(ROWS), S + 3)
    assert torch.equal(seen[0][:, keep], want.repeat_interleave(2, dim=1)[:, keep])
    for step in (1, 2):
        assert torch.equal(seen[step][:, :, 0], (last + step).repeat_interleave(2).expand(3, -1))


@pytest.mark.parametrize("vision", ["none", "grids"])
def test_generate_continues_from_its_cache(vision):
    """A second generate() on the first one's cache (a chat's next turn; the cache holds the image, so
    no pixels, with or without the grids): the new text's positions continue the prompt's, and the
    tokens equal full forwards without a cache."""
    model = _model(2, exact=True)
    batch = _prompt(dtype=torch.float64)
    first = model.generate(
        **batch,
        do_sample=False,
        pad_token_id=PAD,
        suppress_tokens=SUPPRESSED,
        max_new_tokens=4,
        return_dict_in_generate=True,
    )
    cache = first.cache if "cache" in first else first.past_key_values
    turn = torch.randint(3, 280, (len(ROWS), 3))  # the user's next words
    ids = torch.cat([first.sequences, turn], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones(len(ROWS), 4 + 3, dtype=torch.long)], dim=1)
    extra = {"image_grid_thw": batch["image_grid_thw"]} if vision == "grids" else {}
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    seen, handle = _record_positions(model)
    second = _generate(model, dict(input_ids=ids, attention_mask=mask, **extra), max_new_tokens=4, **{cache_kw: cache})
    handle.remove()
    full_mask = torch.cat([mask, torch.ones(len(ROWS), 4, dtype=torch.long)], dim=1)
    want, _ = _index(second, full_mask, batch["image_grid_thw"], 2)
    S = first.sequences.shape[1]
    assert torch.equal(seen[0], want[:, :, S - 1 : ids.shape[1]]), "the uncached tokens of the second call"
    for step in range(1, 4):
        assert torch.equal(seen[step][:, :, 0], want[:, :, ids.shape[1] + step - 1]), f"decoding step {step}"
    vision_inputs = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    reference = _greedy_without_cache(model, dict(input_ids=ids, attention_mask=mask, **vision_inputs), 4, 2)
    assert torch.equal(second, reference)


@with_token_types
def test_stock_positions_unchanged():
    """With stock indices (no MCG-RoPE, or gap 1) the patched model's positions are transformers' own
    wherever transformers computes 3-D positions (mm_token_type_ids given), and the same without them."""
    stock = qwen2_vl_model(dtype=torch.float64)
    batch = make_batch(ROWS, padding="left", dtype=torch.float64)
    batch.pop("labels")
    types = batch.pop("mm_token_type_ids")
    runs = {}
    for name, model, kwargs in (
        ("stock", stock, dict(mm_token_type_ids=types)),
        (
            "patched",
            patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=None, attention=False, loss=False),
            dict(mm_token_type_ids=types),
        ),
        ("patched, no types", patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=None, attention=False, loss=False), {}),
        (
            "gap 1, no types",
            patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=MCGRope(modality_gap=1), attention=False, loss=False),
            {},
        ),
    ):
        seen, handle = _record_positions(model)
        tokens = _generate(model, batch, max_new_tokens=4, **kwargs)
        handle.remove()
        runs[name] = (seen, tokens)
    keep = batch["attention_mask"].bool()
    want_seen, want_tokens = runs.pop("stock")
    for name, (seen, tokens) in runs.items():
        assert torch.equal(tokens, want_tokens), name
        assert torch.equal(seen[0][:, keep], want_seen[0][:, keep]), name
        assert all(torch.equal(a, b) for a, b in zip(seen[1:], want_seen[1:])), name


@with_token_types
def test_contradictory_or_incomplete_inputs_raise():
    model = _model(2)
    batch = make_batch(ROWS, padding="left")
    batch.pop("labels")
    types = batch.pop("mm_token_type_ids")
    wrong = types.clone()
    row, col = (types == 1).nonzero()[0].tolist()
    wrong[row, col] = 0
    stock_indices = patch_qwen2_vl(qwen2_vl_model(), mcg_rope=None, backend="cpu")
    # Stock indices are computed from the types: a forward checks them (and generate() once per call).
    with pytest.raises(ValueError, match=rf"mm_token_type_ids disagrees with input_ids at row {row}, token {col}"):
        stock_indices(**batch, mm_token_type_ids=wrong)
    with pytest.raises(ValueError, match=r"mm_token_type_ids must be a tensor of the shape of input_ids"):
        stock_indices(**batch, mm_token_type_ids=types[:, 1:])
    for m in (model, stock_indices):
        with pytest.raises(ValueError, match="mm_token_type_ids disagrees"):
            m.generate(**batch, mm_token_type_ids=wrong, max_new_tokens=2, pad_token_id=PAD)
    # MCG-RoPE indices read the placeholder ids: a forward's types cannot move a position (not checked,
    # no host sync per training step), the positions are the ids' own.
    seen, handle = _record_positions(model)
    with torch.no_grad():
        model(**batch, mm_token_type_ids=wrong, use_cache=False)
    handle.remove()
    want, _ = _index(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], 2)
    keep = batch["attention_mask"].bool()
    assert torch.equal(seen[0][:, keep], want[:, keep])
    embeds = model.get_input_embeddings()(batch["input_ids"])
    vision = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    with pytest.raises(ValueError, match="without input_ids.*position_ids"):
        model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], image_grid_thw=batch["image_grid_thw"])
    with pytest.raises(ValueError, match="without input_ids"):
        model.generate(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], **vision, max_new_tokens=2, pad_token_id=PAD
        )
