"""Applying and undoing the patch, its errors, the class-level variant, the loss keywords transformers
passes (num_items_in_batch, shift_labels, return_dict) and the trainer helpers."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import transformers

import clinkd
from clinkd.patch import (
    SUPPORTED_TRANSFORMERS,
    MCGRope,
    check_patchable,
    final_hidden_states,
    next_token_targets,
    patch_qwen2_vl,
    patch_qwen2_vl_classes,
    patch_settings,
    unpatch_qwen2_vl,
    unpatch_qwen2_vl_classes,
)
from clinkd.patch._compat import check_transformers_version
from clinkd_kernels.loss import linear_kd_loss_reference
from tests.numerics import assert_close
from tests.patch.compare import assert_close_model
from tests.patch.tiny import (
    MIXED_ROWS,
    TOKEN_TYPES,
    make_batch,
    qwen2_5_vl_model,
    qwen2_vl_config,
    qwen2_vl_model,
    qwen3_vl_model,
)

GAP1 = MCGRope(modality_gap=1, vision_stride=1)


def test_exported_from_clinkd():
    assert clinkd.patch_qwen2_vl is patch_qwen2_vl
    assert clinkd.unpatch_qwen2_vl is unpatch_qwen2_vl
    assert clinkd.patch_qwen2_vl_classes is patch_qwen2_vl_classes


# ---------------------------------------------------------------------------------------------------
# errors


def test_patching_twice_is_an_error():
    model = patch_qwen2_vl(qwen2_vl_model())
    with pytest.raises(RuntimeError, match="already patched"):
        patch_qwen2_vl(model)


@pytest.mark.parametrize("make", [lambda: torch.nn.Linear(2, 2), lambda: qwen2_vl_model().model])
def test_unsupported_model_class(make):
    with pytest.raises(TypeError, match="Qwen2VLForConditionalGeneration"):
        patch_qwen2_vl(make())


def test_mrope_sections_that_do_not_fit_the_head_dim():
    # head_dim 64 → the sections must sum to 32
    model = qwen2_vl_model(rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[8, 12, 10]))
    with pytest.raises(ValueError, match=r"mrope_section.*\[8, 12, 10\].*32"):
        patch_qwen2_vl(model)
    with pytest.raises(ValueError, match="mrope_section"):
        patch_qwen2_vl(model, attention=False)  # the positions alone would be as wrong


def test_head_dim_the_fused_attention_does_not_take():
    model = qwen2_vl_model(
        hidden_size=128,
        num_attention_heads=8,
        num_key_value_heads=4,  # head_dim 16
        rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3]),
    )
    with pytest.raises(ValueError, match="head_dim.*16.*attention=False"):
        patch_qwen2_vl(model)
    patch_qwen2_vl(model, attention=False, backend="cpu")  # positions and loss still apply
    batch = make_batch(MIXED_ROWS)
    assert torch.isfinite(model.train()(**batch).loss)


@pytest.mark.parametrize(
    "overrides,match",
    [(dict(use_sliding_window=True), "sliding_window"), (dict(attention_dropout=0.1), "attention_dropout")],
)
def test_configs_the_fused_attention_cannot_serve(overrides, match):
    with pytest.raises(ValueError, match=match):
        patch_qwen2_vl(qwen2_vl_model(**overrides))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(mcg_rope={"modality_gap": 0}), ValueError, "modality_gap"),
        (dict(mcg_rope={"gap": 2}), ValueError, "modality_gap and vision_stride"),
        (dict(mcg_rope=2), TypeError, "mcg_rope"),
        (dict(attention="yes"), TypeError, "attention"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_options(kwargs, error, match):
    model = qwen2_vl_model()
    with pytest.raises(error, match=match):
        patch_qwen2_vl(model, **kwargs)
    assert patch_settings(model) is None  # nothing was applied


def test_transformers_version_outside_the_supported_range(monkeypatch):
    for good in (
        "5.0.0",
        "5.0.0rc1",
        "5.2.0",
        "5.3.0",
        "5.4.0",
        "5.5.4",
        "5.6.0",
        "5.17.0",
        "5.24.0",
        "5.25.0",
        "5.25.9.dev0",
    ):
        check_transformers_version(good)
    window = ",".join(SUPPORTED_TRANSFORMERS)
    assert window == ">=5.0,<5.26"
    for bad in ("4.57.6", "4.99.0", "5.26.0", "5.26.0rc1", "6.0.0"):
        with pytest.raises(RuntimeError) as info:
            check_transformers_version(bad)
        message = str(info.value)
        assert f"supports transformers {window}, but transformers {bad} is installed" in message, message
        assert f"pip install 'transformers{window}'" in message, message
    # the installed one, as sys.modules holds it now (importing transformers.Trainer replaces the module)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.30.0")
    with pytest.raises(RuntimeError, match="supports transformers"):
        check_transformers_version()
    with pytest.raises(RuntimeError, match="supports transformers"):
        patch_qwen2_vl(qwen2_vl_model())
    with pytest.raises(RuntimeError, match="supports transformers"):
        patch_qwen2_vl_classes("Qwen2-VL")


def test_check_patchable_on_a_config_alone():
    """The config checks of the patch without a model: what patch_qwen2_vl would raise, for the same options."""
    assert check_patchable(qwen2_vl_config()).attention
    assert check_patchable(qwen2_vl_config().text_config, mcg_rope=None).mcg_rope is None
    small = qwen2_vl_config(
        hidden_size=128,
        num_attention_heads=8,
        num_key_value_heads=4,  # head_dim 16
        rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3]),
    )
    with pytest.raises(
        ValueError,
        match=r"supports head_dim in \(64, 72, 80, 96, 128\), this model has 16; "
        "patch with attention=False",
    ):
        check_patchable(small)
    assert not check_patchable(small, attention=False).attention
    with pytest.raises(ValueError, match="mrope_section"):
        check_patchable(
            qwen2_vl_config(rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[8, 12, 10])),
            attention=False,
        )
    with pytest.raises(ValueError, match="use_sliding_window"):
        check_patchable(qwen2_vl_config(use_sliding_window=True))
    with pytest.raises(TypeError, match="attention"):
        check_patchable(qwen2_vl_config(), attention="yes")
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="model types qwen2_vl, qwen2_5_vl, qwen3_vl.*got llama"):
        check_patchable(LlamaConfig())


def test_qwen3_vl_sections_that_do_not_fit_the_interleaved_layout_are_refused_before_any_change():
    model = qwen3_vl_model()
    rope = dict(model.config.text_config.rope_parameters, mrope_section=[8, 12, 12])  # sums to 32, h/w too wide
    model.config.text_config.rope_parameters = rope
    before = {n: type(m).forward for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"Qwen3-VL config: .*mrope_section.*\[8, 12, 12\].*interleaved"):
        patch_qwen2_vl(model)
    assert patch_settings(model) is None and {n: type(m).forward for n, m in model.named_modules()} == before
    assert not any("forward" in vars(m) for m in model.modules())
    with pytest.raises(ValueError, match="interleaved"):
        check_patchable(model.config)


def test_qwen2_5_vl_video_seconds_must_cover_every_video():
    model = patch_qwen2_vl(qwen2_5_vl_model(), backend="cpu")
    ids = torch.tensor([[5, 292] + [291] * 4 + [293, 292] + [291] * 4 + [293, 6]])
    grids = torch.tensor([[1, 4, 4], [1, 4, 4]])
    with pytest.raises(ValueError, match="second_per_grid_ts has 1 entries for 2 videos"):
        types = {"mm_token_type_ids": (ids == 291).long() * 2} if TOKEN_TYPES else {}
        model.model.get_rope_index(ids, **types, video_grid_thw=grids, second_per_grid_ts=torch.tensor([1.0]))


@pytest.mark.parametrize("family", ["Qwen2.5-VL", "Qwen3-VL"])
def test_class_patch_of_the_newer_families_is_undone(family, fused_calls):
    make = qwen2_5_vl_model if family == "Qwen2.5-VL" else qwen3_vl_model
    batch = make_batch(MIXED_ROWS)
    torch.manual_seed(3)
    want = make()(**batch, use_cache=False).loss
    patch_qwen2_vl_classes(family, mcg_rope=MCGRope(modality_gap=1), backend="cpu")
    try:
        torch.manual_seed(3)  # the same weights: the patched constructor draws as the stock one
        model = make()
        assert patch_settings(model).family == family
        loss = model(**batch, use_cache=False).loss
    finally:
        unpatch_qwen2_vl_classes(family)
    assert fused_calls == {"attention": 2, "loss": 1}
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)  # fp32 both: equivalence is test_families.py's
    assert patch_settings(make()) is None


# ---------------------------------------------------------------------------------------------------
# undoing, class-level patch


def test_unpatch_restores_the_stock_model(fused_calls):
    stock = qwen2_vl_model().train()
    model = copy.deepcopy(stock)
    patch_qwen2_vl(model, backend="cpu")
    assert patch_settings(model).mcg_rope == MCGRope(2, 1)
    unpatch_qwen2_vl(model)
    assert patch_settings(model) is None
    assert all("forward" not in vars(m) and "get_rope_index" not in vars(m) for m in model.modules())
    batch = make_batch(MIXED_ROWS, padding="left")
    assert torch.equal(model(**batch).loss, stock(**batch).loss)
    assert fused_calls == {"attention": 0, "loss": 0}
    with pytest.raises(RuntimeError, match="not patched"):
        unpatch_qwen2_vl(model)
    patch_qwen2_vl(model, mcg_rope=None, backend="cpu")  # patchable again, with other settings
    model(**batch)
    assert fused_calls == {"attention": 2, "loss": 1}


def test_class_patch_applies_to_new_models_and_is_undone(fused_calls):
    stock = qwen2_vl_model().train()
    batch = make_batch(MIXED_ROWS, padding="right")
    want = stock(**batch, use_cache=False).loss
    patch_qwen2_vl_classes("Qwen2-VL", mcg_rope=GAP1, backend="cpu")
    try:
        with pytest.raises(RuntimeError, match="already patched"):
            patch_qwen2_vl_classes("Qwen2-VL")
        model = transformers.Qwen2VLForConditionalGeneration(stock.config)
        model.load_state_dict(stock.state_dict())
        with pytest.raises(RuntimeError, match="class was patched"):
            patch_qwen2_vl(model)
        got = model.train()(**batch, use_cache=False).loss
        assert fused_calls == {"attention": 2, "loss": 1}
        assert_close_model("loss", got, want.double(), want)  # two fp32 runs of a model: ulps apart
        bad = qwen2_vl_config(rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[8, 8, 8]))
        with pytest.raises(ValueError, match="mrope_section"):
            transformers.Qwen2VLForConditionalGeneration(bad)
    finally:
        unpatch_qwen2_vl_classes("Qwen2-VL")
    with pytest.raises(RuntimeError, match="not patched"):
        unpatch_qwen2_vl_classes("Qwen2-VL")
    fresh = transformers.Qwen2VLForConditionalGeneration(stock.config)
    fresh.load_state_dict(stock.state_dict())
    fresh.train()(**batch, use_cache=False)
    assert fused_calls == {"attention": 2, "loss": 1}  # unchanged: the stock classes are back
    with pytest.raises(ValueError, match="unknown model family"):
        patch_qwen2_vl_classes("Llama")


# ---------------------------------------------------------------------------------------------------
# loss keywords and helpers


def test_loss_keywords_match_stock():
    stock = qwen2_vl_model().train()
    patched = patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=GAP1, backend="cpu")
    batch = make_batch(MIXED_ROWS, padding="left")
    n = torch.tensor(37)
    assert_close_model(
        "sum / num_items_in_batch",
        patched(**batch, num_items_in_batch=n).loss,
        stock.double()(**{**batch, "pixel_values": batch["pixel_values"].double()}, num_items_in_batch=n).loss,
        stock.float()(**batch, num_items_in_batch=n).loss,
    )
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    assert_close_model(
        "shift_labels",
        patched(**no_labels, shift_labels=shifted).loss,
        stock(**batch).loss.double(),
        stock(**batch).loss,
    )
    out = patched(**batch, return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0


def test_logits_only_when_asked():
    model = patch_qwen2_vl(qwen2_vl_model(), backend="cpu")
    batch = make_batch(MIXED_ROWS)
    assert model.train()(**batch).logits is None
    assert model(**batch, return_logits=True).logits.shape == (*batch["input_ids"].shape, 300)
    assert model.eval()(**batch).logits is not None  # evaluation loops read logits
    assert model(**batch, return_logits=False).logits is None
    assert model(**batch, return_logits=True, logits_to_keep=1).logits.shape[1] == 1


def test_next_token_targets():
    labels = torch.tensor([[5, -100, 7, 8], [-100, 9, 10, -100]])
    rows, targets = next_token_targets(labels)
    # position s predicts labels[s+1]: row 0 → [-100, 7, 8, none], row 1 → [9, 10, -100, none]
    assert rows.tolist() == [1, 2, 4, 5] and targets.tolist() == [7, 8, 9, 10]
    rows, targets = next_token_targets(labels, drop_ignored=False)
    assert rows.tolist() == list(range(8)) and targets.tolist() == [-100, 7, 8, -100, 9, 10, -100, -100]
    with pytest.raises(ValueError, match="labels"):
        next_token_targets(None)


def test_final_hidden_states_feed_a_distillation_loss():
    student = patch_qwen2_vl(qwen2_vl_model().train(), backend="cpu")
    teacher = qwen2_vl_model()
    batch = make_batch(MIXED_ROWS, padding="left")
    rows, targets = next_token_targets(batch["labels"])

    h, head = final_hidden_states(student, **batch)
    assert head is student.lm_head and h.shape == (*batch["input_ids"].shape, 256)
    ce = clinkd.patch.loss.linear_kd_loss(
        h.flatten(0, 1)[rows], head.weight, targets, alpha=0.0, beta=1.0, backend="cpu"
    )
    assert_close_model("CE from the helper", ce, student(**batch).loss.double(), student(**batch).loss)

    with torch.no_grad():
        th, thead = final_hidden_states(teacher, **batch)
    kw = dict(temperature=0.5, alpha=0.5, beta=1.0)
    got = clinkd.patch.loss.linear_kd_loss(
        h.flatten(0, 1)[rows],
        head.weight,
        targets,
        teacher_hidden=th.flatten(0, 1)[rows],
        teacher_weight=thead.weight,
        backend="cpu",
        **kw,
    )
    sh, tw, th64 = h.detach().flatten(0, 1)[rows], head.weight.detach(), th.flatten(0, 1)[rows]
    ref = linear_kd_loss_reference(
        sh.double(), tw.double(), targets, teacher_hidden=th64.double(), teacher_weight=thead.weight.double(), **kw
    )
    base = linear_kd_loss_reference(sh, tw, targets, teacher_hidden=th64, teacher_weight=thead.weight, **kw)
    assert_close("KD + CE", got, ref, base)
    got.backward()
    assert student.model.language_model.embed_tokens.weight.grad is not None


def test_autocast_bf16_loss_close_to_fp32():
    """Under autocast (fp32 weights) the lm_head operands are cast like ``head(hidden)`` would be."""
    model = patch_qwen2_vl(qwen2_vl_model().train(), backend="cpu")
    batch = make_batch(MIXED_ROWS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(**batch, use_cache=False).loss
    low.backward()
    full = model(**batch, use_cache=False).loss
    assert torch.isfinite(low) and abs(low.item() - full.item()) < 0.05 * abs(full.item())
    assert model.lm_head.weight.grad.dtype == torch.float32


def test_all_labels_ignored_gives_zero_loss():
    model = patch_qwen2_vl(qwen2_vl_model().train(), backend="cpu")
    batch = make_batch(MIXED_ROWS)
    batch["labels"].fill_(-100)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    assert loss.item() == 0.0 and model.lm_head.weight.grad.abs().sum() == 0


@pytest.mark.slow
def test_peak_memory_script_shows_the_logits_saving():
    """The measurement script end to end at a small size (the report's figures use the defaults:
    ``python -m tests.patch.peak_memory``). Stock keeps [512 × 151936] fp32 logits (297 MiB) and
    their gradient; patched must stay below stock by at least that much."""
    from tests.patch.peak_memory import measure

    options = dict(tokens=512, hidden=128, vocab=151936, layers=1)
    stock, patched = measure("stock", **options), measure("patched", **options)
    assert abs(stock["loss"] - patched["loss"]) < 1e-3 * abs(stock["loss"])
    assert 0 < patched["peak_step_mib"] < stock["peak_step_mib"] - 297, (stock, patched)


def test_a_deep_copy_of_a_patched_model_runs_on_its_own_weights():
    """copy.deepcopy of a patched model: the copy's forward (fused and stock paths) uses the copy's
    weights, unpatching the copy leaves the original patched, and each equals a fresh patch of itself."""
    model = patch_qwen2_vl(qwen2_vl_model(), mcg_rope=MCGRope(modality_gap=2), backend="cpu")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    batch = make_batch(MIXED_ROWS, padding="left")
    batch.pop("labels")
    with torch.no_grad():
        got = twin(**batch, use_cache=False).logits
        fresh = patch_qwen2_vl(
            copy.deepcopy(unpatch_qwen2_vl(copy.deepcopy(twin))), mcg_rope=MCGRope(modality_gap=2), backend="cpu"
        )(**batch, use_cache=False).logits
        original = model(**batch, use_cache=False).logits
    torch.testing.assert_close(got, fresh)
    assert not torch.allclose(got, original)
    unpatch_qwen2_vl(twin)
    assert patch_settings(model) is not None and patch_settings(twin) is None
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, use_cache=False).logits, original)


def test_apply_to_transformers_patches_every_family_and_reverts(fused_calls):
    """The entry point inside other trainers: every family's classes patched at once (models built
    afterwards run fused and, at gap 1, equal stock), refusing a second call, reverted by one call."""
    import clinkd
    from clinkd.patch._compat import FAMILIES

    stock = qwen2_vl_model().train()
    batch = make_batch(MIXED_ROWS, padding="right")
    want = stock(**batch, use_cache=False).loss
    applied = clinkd.apply_to_transformers(mcg_rope=GAP1, backend="cpu")
    try:
        assert set(applied) == {f.name for f in FAMILIES if f.available()}
        assert all(s.mcg_rope == GAP1 and s.attention and s.loss for s in applied.values())
        for family in FAMILIES:
            assert patch_settings(family.cls("ForConditionalGeneration")) == applied[family.name]
        with pytest.raises(RuntimeError, match="already patched by clinkd; call revert_transformers"):
            clinkd.apply_to_transformers()
        model = transformers.Qwen2VLForConditionalGeneration(stock.config)
        model.load_state_dict(stock.state_dict())
        got = model.train()(**batch, use_cache=False).loss
        assert fused_calls == {"attention": 2, "loss": 1}
        assert_close_model("loss", got, want.double(), want)
    finally:
        restored = clinkd.revert_transformers()
    assert set(restored) == set(applied)
    assert all(patch_settings(f.cls("ForConditionalGeneration")) is None for f in FAMILIES)
    assert clinkd.revert_transformers() == []
    # a bad option changes nothing
    with pytest.raises(ValueError, match="backend must be one of"):
        clinkd.apply_to_transformers(backend="cuda-please")
    assert all(patch_settings(f.cls("ForConditionalGeneration")) is None for f in FAMILIES)
    with pytest.raises(ValueError, match="unknown model family"):
        clinkd.apply_to_transformers(families=("Llama",))
