"""Comparisons of a patched model with the stock one (the §4 rule through a whole model): one training
step's loss, logits and every parameter gradient against the stock model in float64 (reference) and in
the test's dtype (baseline)."""

from __future__ import annotations

import copy

import torch

from tests.numerics import NORM_TOL, assert_close


def as_dtype(batch: dict, dtype, device=None) -> dict:
    return {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in batch.items()}


def training_step(model, batch, **kwargs):
    """One training step's outputs: (output, {name: grad}) of loss.backward()."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def compare_with_stock(stock, patched, batch, *, keep=None, **kwargs):
    """Loss, logits (on ``keep`` tokens) and every parameter gradient of ``patched`` vs stock fp64/fp32."""
    ref, ref_grads = training_step(
        copy.deepcopy(stock).double(), as_dtype(batch, torch.float64, batch["input_ids"].device), **kwargs
    )
    base, base_grads = training_step(stock, batch, **kwargs)
    out, grads = training_step(patched, batch, return_logits=True, **kwargs)
    assert_close_model("loss", out.loss, ref.loss, base.loss)  # through the whole model, like the logits
    keep = torch.ones_like(batch["input_ids"], dtype=torch.bool) if keep is None else keep
    assert_close_model("logits", out.logits[keep], ref.logits[keep], base.logits[keep])
    assert set(grads) == set(ref_grads), "patched and stock models have gradients for different parameters"
    for name, ref_grad in ref_grads.items():
        assert_close_model(f"grad {name}", grads[name], ref_grad, base_grads[name])


def compare_with_stock_fed(stock, out, grads, batch, position_ids):
    """A patched step's (output, grads) against the stock model given ``position_ids`` explicitly:
    the reference in float64, the baseline in float32; logits on the unpadded tokens."""
    fed = dict(batch, position_ids=position_ids)
    ref, ref_grads = training_step(copy.deepcopy(stock).double(), as_dtype(fed, torch.float64), use_cache=False)
    base, base_grads = training_step(stock, fed, use_cache=False)
    keep = batch["attention_mask"].bool()
    assert_close_model("loss", out.loss, ref.loss, base.loss)
    assert_close_model("logits", out.logits[keep], ref.logits[keep], base.logits[keep])
    for name, ref_grad in ref_grads.items():
        assert_close_model(f"grad {name}", grads[name], ref_grad, base_grads[name])


def assert_close_model(name, out, ref, base):
    """§4 rule for quantities computed through a whole model (logits, gradients): rounding accumulates
    over every layer, so the absolute slack scales with the tensor (tol·max|ref|) and the norm bound is
    tol or twice the stock model's own relative error in that dtype, whichever is larger
    (tol = 1e-5 fp32, 1e-2 bf16)."""
    tol = NORM_TOL[out.dtype]
    ref64 = ref.double()
    scale = ref64.abs().max().item()
    base_rel = ((base.double() - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()
    assert_close(name, out, ref, base, atol=tol * scale, norm_tol=max(tol, 2 * base_rel))
