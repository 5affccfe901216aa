"""The fused loss reads the lm_head's weight inside the head's forward, where a sharding engine hands
out the full weight: emulated here with the engine's contract (an empty placeholder outside the forward,
the full weight swapped in by a pre-forward hook), and the clear error for a placeholder read outside."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from clinkd.patch import lm_head_operands, patch_qwen2_vl
from clinkd.patch.head import call_in_forward, check_full_weight
from tests.data import tiny
from tests.train import setup


class Partitioned:
    """ZeRO-3's contract on one module: ``weight`` is a 0-element placeholder except during the module's
    forward, when a pre-forward hook puts the full parameter in place (and a forward hook takes it out)."""

    def __init__(self, module: nn.Module):
        self.full = module.weight
        self.placeholder = nn.Parameter(torch.empty(0))
        module.weight = self.placeholder
        module.register_forward_pre_hook(lambda m, args: setattr(m, "weight", self.full))
        module.register_forward_hook(lambda m, args, out: setattr(m, "weight", self.placeholder))


def test_call_in_forward_runs_inside_the_hooks_and_restores_the_forward():
    head = nn.Linear(4, 6, bias=False)
    seen = []
    head.register_forward_pre_hook(lambda m, a: seen.append("pre"))
    out = call_in_forward(head, lambda m, x: (seen.append("fn"), m.weight.sum() * x)[1], torch.tensor(2.0))
    assert seen == ["pre", "fn"] and torch.equal(out, head.weight.sum() * 2)
    assert "forward" not in head.__dict__ and head(torch.ones(1, 4)).shape == (1, 6)


@pytest.mark.parametrize("loss_patch", [True])
def test_the_patched_loss_gets_the_weight_and_its_gradient_under_a_partitioning_engine(tmp_path, loss_patch):
    data = setup.dataset(tmp_path, 4)
    batch = tiny.collator()([data[i] for i in range(4)])
    stock = setup.student()
    ours = patch_qwen2_vl(copy.deepcopy(stock), mcg_rope=None, attention=False, loss=loss_patch)
    engine = Partitioned(ours.lm_head)
    inputs = {k: v for k, v in batch.items() if k != "sample_index"}
    want = stock(**inputs).loss
    want.backward()
    got = ours(**inputs).loss
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(engine.full.grad, stock.lm_head.weight.grad, rtol=1e-4, atol=1e-6)
    assert ours.lm_head.weight.numel() == 0  # the placeholder is back after the forward


def test_a_placeholder_read_outside_the_forward_is_a_clear_error():
    head = nn.Linear(8, 16, bias=False)
    Partitioned(head)
    with pytest.raises(ValueError, match="0 elements.*partitioned parameter.*ZeRO-3.*call_in_forward"):
        lm_head_operands(torch.randn(3, 8), head)
    with pytest.raises(ValueError, match="the teacher's lm_head.weight has 0 elements"):
        check_full_weight(head.weight, "the teacher's lm_head.weight")
    out = call_in_forward(head, lambda m, h: lm_head_operands(h, m)[1].shape, torch.randn(3, 8))
    assert out == (16, 8)  # inside the forward it is the full weight


def test_the_trainer_loss_runs_inside_the_partitioned_head(tmp_path):
    data = setup.dataset(tmp_path, 4)
    model = setup.student()
    reference = copy.deepcopy(model)
    trainer = setup.trainer(model, tmp_path / "a", data, steps=1, batch=4)
    batch = tiny.collator()([data[i] for i in range(4)])
    want = trainer.compute_loss(model, dict(batch))
    engine = Partitioned(model.lm_head)
    got = trainer.compute_loss(model, dict(batch))
    got.backward()
    torch.testing.assert_close(got, want)
    loss = setup.trainer(reference, tmp_path / "b", data, steps=1, batch=4).compute_loss(reference, dict(batch))
    loss.backward()
    torch.testing.assert_close(engine.full.grad, reference.lm_head.weight.grad, rtol=1e-5, atol=1e-7)
