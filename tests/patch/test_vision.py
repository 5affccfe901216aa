"""The vision tower on the fused kernel: patched towers of Qwen2-VL, Qwen2.5-VL (window attention) and
Qwen3-VL equal the stock towers — outputs and every parameter's gradient under the float64 rule —
on several images of different grids and a video, on the CPU path and on the Triton path under the
interpreter; the option's defaults and refusals; a tower whose head_dim the kernel does not take.
Before transformers 5.17 the tower builds its cos/sin itself (no axial rotary module to hand on the
coordinates): there the fused tower is not offered, and the last test holds the refusal instead."""

from __future__ import annotations

import copy

import pytest
import torch

import clinkd.patch.vision as vision_mod
from clinkd.patch import patch_qwen2_vl, patch_qwen2_vl_classes, patch_settings, unpatch_qwen2_vl_classes
from clinkd.patch._compat import axial_vision_rotary, family_by_name
from tests.patch.compare import assert_close_model
from tests.patch.tiny import PATCH_DIM, qwen2_5_vl_model, qwen2_vl_model, qwen3_vl_model

# Images of different grids (h, w before the 2x2 merge) and a 2-frame video, as the processor packs them.
GRIDS = torch.tensor([[1, 8, 12], [1, 4, 4], [2, 8, 8]])
SMALL_GRIDS = torch.tensor([[1, 8, 8], [2, 4, 8]])  # for the interpreter
AXIAL = all(axial_vision_rotary(family_by_name(f)) for f in ("Qwen2-VL", "Qwen2.5-VL", "Qwen3-VL"))
served_here = pytest.mark.skipif(
    not AXIAL,
    reason="transformers < 5.17 has no axial vision rotary: the fused "
    "tower is refused there (test_older_towers_stay_stock)",
)


def _tower_model(family: str):
    """A tiny model whose vision tower has head_dim 80 (Qwen3-VL: its real 72), two blocks; Qwen2.5-VL with
    windows of 2x2 merged tokens in block 0 and full attention in block 1."""
    if family == "Qwen2-VL":
        model = qwen2_vl_model()
        cfg = dict(depth=2, embed_dim=160, num_heads=2)
    elif family == "Qwen2.5-VL":
        model = qwen2_5_vl_model()
        cfg = dict(depth=2, hidden_size=160, num_heads=2, window_size=8, fullatt_block_indexes=[1])
    else:
        model = qwen3_vl_model()
        cfg = dict(depth=2, hidden_size=144, num_heads=2, deepstack_visual_indexes=[0])
    config = copy.deepcopy(model.config)
    for key, value in cfg.items():
        setattr(config.vision_config, key, value)
    torch.manual_seed(0)
    model = type(model)(config)
    with torch.no_grad():
        for p in model.model.visual.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    return model.train()


def _run_tower(model, pixels, grids):
    """(outputs, {name: grad}) of the tower: last hidden state and merged output, backward of both."""
    visual = model.model.visual
    visual.zero_grad(set_to_none=True)
    out = visual(pixels, grid_thw=grids)
    outputs = [out.last_hidden_state, out.pooler_output]
    if getattr(out, "deepstack_features", None):
        outputs += list(out.deepstack_features)
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outputs)
    loss.backward()
    return [o.detach() for o in outputs], {n: p.grad for n, p in visual.named_parameters() if p.grad is not None}


@pytest.fixture
def vision_calls(monkeypatch):
    calls = []
    real = vision_mod.mcg_rope_attention
    monkeypatch.setattr(
        vision_mod, "mcg_rope_attention", lambda *a, **k: calls.append(k["cu_seqlens"]) or real(*a, **k)
    )
    return calls


@served_here
@pytest.mark.parametrize("family", ["Qwen2-VL", "Qwen2.5-VL", "Qwen3-VL"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_patched_tower_equals_stock(family, backend, vision_calls, request):
    if backend == "triton":
        request.getfixturevalue("interpreter")
    stock = _tower_model(family)
    patched = patch_qwen2_vl(copy.deepcopy(stock), backend=backend, attention=False, loss=False)
    assert patch_settings(patched).vision_attention  # on by default where the tower is served
    grids = GRIDS if backend == "cpu" else SMALL_GRIDS
    pixels = torch.randn(int(grids.prod(-1).sum()), PATCH_DIM)
    ref, ref_grads = _run_tower(copy.deepcopy(stock).double(), pixels.double(), grids)
    base, base_grads = _run_tower(stock, pixels, grids)
    out, grads = _run_tower(patched, pixels, grids)
    assert len(vision_calls) == 2  # both blocks ran on the fused kernel
    if family == "Qwen2.5-VL":  # block 0 attends within windows, block 1 within images/frames
        assert len(vision_calls[0]) > len(vision_calls[1])
    for i, (o, r, b) in enumerate(zip(out, ref, base)):
        assert_close_model(f"output {i}", o, r, b)
    assert set(grads) == set(ref_grads)
    for name, ref_grad in ref_grads.items():
        assert_close_model(f"grad {name}", grads[name], ref_grad, base_grads[name])


@served_here
def test_whole_model_with_the_fused_tower_equals_stock(vision_calls):
    """The tower inside a full training step (Qwen2.5-VL, windows): loss and gradients as stock."""
    from tests.patch.compare import compare_with_stock
    from tests.patch.tiny import make_batch

    stock = _tower_model("Qwen2.5-VL")
    patched = patch_qwen2_vl(copy.deepcopy(stock), mcg_rope={"modality_gap": 1}, backend="cpu")
    batch = make_batch([[3, (1, 8, 12), 2], [2, (1, 4, 4), 3, (1, 8, 8), 1]], padding="left")
    compare_with_stock(stock, patched, batch, keep=batch["attention_mask"].bool(), use_cache=False)
    assert len(vision_calls) == 2


@served_here
def test_defaults_and_refusals():
    tiny = qwen3_vl_model()  # vision head_dim 16: not served
    assert patch_settings(patch_qwen2_vl(copy.deepcopy(tiny), backend="cpu")).vision_attention is False
    with pytest.raises(ValueError, match=r"Qwen3-VL vision config: head_dim 16 .*vision_attention=False"):
        patch_qwen2_vl(tiny, vision_attention=True)
    assert patch_settings(tiny) is None and not any("forward" in vars(m) for m in tiny.modules())
    with pytest.raises(TypeError, match="vision_attention must be a bool or None"):
        patch_qwen2_vl(tiny, vision_attention="yes")
    served = _tower_model("Qwen2-VL")
    assert patch_settings(patch_qwen2_vl(served, vision_attention=False)).vision_attention is False
    assert not any("forward" in vars(m) for m in served.model.visual.modules())


@served_here
def test_class_patch_serves_what_it_can(vision_calls):
    """Class-patched: a tower the kernel takes runs fused, one it does not (head_dim 16) runs the stock
    layer on the stock tables made from the coordinates; both equal stock."""
    grids = torch.tensor([[1, 4, 8], [1, 4, 4]])
    pixels = torch.randn(int(grids.prod(-1).sum()), PATCH_DIM, dtype=torch.float64)
    stock_served, stock_tiny = _tower_model("Qwen3-VL").double(), qwen3_vl_model(dtype=torch.float64).train()
    want = [_run_tower(m, pixels, grids) for m in (stock_served, stock_tiny)]
    patch_qwen2_vl_classes("Qwen3-VL", backend="cpu", attention=False, loss=False)
    try:
        got = [_run_tower(m, pixels, grids) for m in (copy.deepcopy(stock_served), copy.deepcopy(stock_tiny))]
    finally:
        unpatch_qwen2_vl_classes("Qwen3-VL")
    assert len(vision_calls) == 2  # the served tower's two blocks; the tiny tower's block ran stock
    # float64 throughout: the stock rotary's tables are fp32 (cos of the fp32 angle), the fused path's
    # float64, so they agree to fp32 rounding (relative 1e-6 in norm); the stock-fallback tower is the
    # stock computation exactly.
    for (out, grads), (ref, ref_grads), tol in zip(got, want, (1e-6, 0.0)):
        for name, o, r in [(f"output {i}", o, r) for i, (o, r) in enumerate(zip(out, ref))] + [
            (n, grads[n], g) for n, g in ref_grads.items()
        ]:
            assert ((o - r).norm() <= tol * r.norm()).item(), f"{name}: {((o - r).norm() / r.norm()).item():.2e}"


@served_here
def test_class_patch_with_vision_attention_true_refuses_a_tower_it_cannot_serve():
    from transformers import Qwen3VLForConditionalGeneration

    served, tiny = _tower_model("Qwen3-VL").config, qwen3_vl_model().config
    patch_qwen2_vl_classes("Qwen3-VL", vision_attention=True)
    try:
        with pytest.raises(ValueError, match="head_dim 16"):
            Qwen3VLForConditionalGeneration(tiny)
        assert patch_settings(Qwen3VLForConditionalGeneration(served)).vision_attention
    finally:
        unpatch_qwen2_vl_classes("Qwen3-VL")


@pytest.mark.skipif(AXIAL, reason="transformers 5.17+ serves the fused tower (the tests above)")
def test_older_towers_stay_stock():
    """transformers < 5.17: vision_attention=None leaves the tower stock, True is refused by name before
    anything changes, and the class patch leaves the vision classes alone."""
    grids = torch.tensor([[1, 4, 8], [1, 4, 4]])
    pixels = torch.randn(int(grids.prod(-1).sum()), PATCH_DIM)
    for family, build in (("Qwen2-VL", qwen2_vl_model), ("Qwen3-VL", qwen3_vl_model)):
        stock = build().train()
        patched = patch_qwen2_vl(copy.deepcopy(stock), backend="cpu")
        assert patch_settings(patched).vision_attention is False
        assert not any("forward" in vars(m) for m in patched.model.visual.modules())
        (out, _), (ref, _) = _run_tower(patched, pixels, grids), _run_tower(stock, pixels, grids)
        assert all(torch.equal(o, r) for o, r in zip(out, ref))
        with pytest.raises(ValueError, match=r"vision_attention=True: .*transformers 5\.17\+.*vision_attention=None"):
            patch_qwen2_vl(stock, vision_attention=True)
        assert patch_settings(stock) is None and not any("forward" in vars(m) for m in stock.modules())
        fam = family_by_name(family)
        before = {n: vars(fam.modeling())[n].forward for n in (fam.vision_attention,) if n in vars(fam.modeling())}
        patch_qwen2_vl_classes(family, backend="cpu")
        try:
            assert all(vars(fam.modeling())[n].forward is f for n, f in before.items())
        finally:
            unpatch_qwen2_vl_classes(family)
