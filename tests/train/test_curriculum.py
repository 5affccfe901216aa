"""The confidence-margin curriculum: the schedule, the weights, and what the trainer feeds the loss."""

from __future__ import annotations

import math

import pytest
import torch

import clinkd.train.trainer as trainer_module
from clinkd.data import tokenizer_fingerprint
from clinkd.distill import PseudoLabelStore, StoreMeta, cache_pseudo_labels
from clinkd.train import KDSettings, MarginCurriculum, margin_weights
from tests.data import tiny
from tests.train import setup


@pytest.mark.parametrize("f0, warmup", [(0.5, 10), (0.2, 3), (1.0, 5), (0.7, 0)])
def test_fraction_schedule(f0, warmup):
    c = MarginCurriculum(start_fraction=f0, warmup_steps=warmup)
    for step in range(0, 2 * warmup + 3):
        want = 1.0 if warmup == 0 else f0 + (1 - f0) * min(step, warmup) / warmup
        assert c.fraction(step) == pytest.approx(want, abs=1e-12)
    assert c.fraction(10**6) == 1.0
    if warmup:
        assert c.fraction(0) == pytest.approx(f0) and c.fraction(warmup // 2) <= c.fraction(warmup // 2 + 1)


@pytest.mark.parametrize("n", [1, 7, 64, 129])
def test_weights_keep_the_most_confident_tokens(n):
    margin = torch.rand(n)
    for fraction in (0.01, 0.3, 0.5, 0.999, 1.0):
        w = margin_weights(margin, fraction)
        keep = math.ceil(fraction * n)
        assert w.dtype == torch.float32 and set(w.unique().tolist()) <= {0.0, 1.0}
        assert int(w.sum()) == keep
        if keep < n:
            assert margin[w == 1].min() >= margin[w == 0].max()


def test_weights_break_ties_by_position():
    margin = torch.tensor([0.5, 0.9, 0.5, 0.5, 0.1])
    assert margin_weights(margin, 0.6).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]  # 3 kept: 0.9, then the first two 0.5
    assert margin_weights(torch.zeros(0), 0.5).numel() == 0


def test_curriculum_input_errors():
    with pytest.raises(ValueError, match="start_fraction"):
        MarginCurriculum(start_fraction=0.0)
    with pytest.raises(ValueError, match="start_fraction"):
        MarginCurriculum(start_fraction=1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        MarginCurriculum(warmup_steps=-1)
    with pytest.raises(ValueError, match="warmup_steps"):
        MarginCurriculum(warmup_steps=2.5)
    with pytest.raises(ValueError, match="margin must be"):
        margin_weights(torch.rand(2, 3), 0.5)
    with pytest.raises(ValueError, match="fraction"):
        margin_weights(torch.rand(3), 0.0)


def test_trainer_feeds_the_scheduled_weights_to_the_loss(tmp_path, monkeypatch):
    """Over a short KD run, the token_weights reaching linear_kd_loss at optimizer step s keep exactly
    the ceil(f(s)·N) largest-margin supervised tokens of the batch."""
    data = setup.dataset(tmp_path / "data", n=6)
    vocab = len(tiny.processor().tokenizer)
    meta = StoreMeta(
        teacher="t",
        k=4,
        temperature=1.0,
        vocab_size=vocab,
        tokenizer_hash=tokenizer_fingerprint(tiny.processor().tokenizer),
    )
    cache_pseudo_labels(setup.teacher(), data, setup.collator(), tmp_path / "store", meta=meta, progress=False)
    store = PseudoLabelStore(tmp_path / "store", expect=meta)
    curriculum = MarginCurriculum(start_fraction=0.25, warmup_steps=4)
    seen = []
    real = trainer_module.linear_kd_loss

    def spy(hidden, weight, labels, **kw):
        seen.append((kw["token_weights"], kw["teacher"].margin, labels.numel()))
        return real(hidden, weight, labels, **kw)

    monkeypatch.setattr(trainer_module, "linear_kd_loss", spy)
    t = setup.trainer(
        setup.student(),
        tmp_path / "out",
        data,
        steps=6,
        batch=2,
        kd=KDSettings(topk=4, temperature=1.0, curriculum=curriculum),
        store=store,
    )
    t.train()
    assert len(seen) == 6
    for step, (weights, margin, n) in enumerate(seen):
        f = 0.25 + 0.75 * min(step, 4) / 4
        if f == 1.0:  # warm-up over: every token, so no weights at all (the same loss as all-ones weights)
            assert weights is None, step
            continue
        assert weights.shape == (n,) and int(weights.sum()) == math.ceil(f * n - 1e-9), step
        if weights.sum() < n:
            assert margin[weights == 1].min() >= margin[weights == 0].max()
    logged = [h["kd_fraction"] for h in t.state.log_history if "kd_fraction" in h]
    assert logged == pytest.approx([0.25 + 0.75 * min(s, 4) / 4 for s in range(1, 7)])  # logged after each step


def test_online_dense_teacher_skips_the_margin_pass_after_the_warm_up(tmp_path, monkeypatch):
    """The dense online teacher's margins cost an extra pass over its lm_head: made only while the
    curriculum still ranks tokens (steps 0 and 1 of a 2-step warm-up), with the weights they give."""
    data = setup.dataset(tmp_path / "data", n=4)
    margin_passes, weights_seen = [], []
    import clinkd.distill.cache as cache_module

    real_topk, real_loss = cache_module.topk_pseudo_labels, trainer_module.linear_kd_loss

    def topk_spy(logits, k, **kw):
        margin_passes.append(k)
        return real_topk(logits, k, **kw)

    def loss_spy(hidden, weight, labels, **kw):
        weights_seen.append(kw["token_weights"])
        assert kw["teacher_hidden"] is not None
        return real_loss(hidden, weight, labels, **kw)

    monkeypatch.setattr(cache_module, "topk_pseudo_labels", topk_spy)
    monkeypatch.setattr(trainer_module, "linear_kd_loss", loss_spy)
    t = setup.trainer(
        setup.student(),
        tmp_path / "out",
        data,
        steps=4,
        batch=2,
        kd=KDSettings(topk=None, curriculum=MarginCurriculum(start_fraction=0.5, warmup_steps=2)),
        teacher=setup.teacher(),
    )
    t.train()
    assert len(weights_seen) == 4 and margin_passes == [2, 2]  # top-2 margins at steps 0 and 1 only
    assert all(w is not None and 0 < int(w.sum()) < w.numel() for w in weights_seen[:2])
    assert weights_seen[2] is None and weights_seen[3] is None
