"""The KD stage's loss: store = online teacher for the same top-k, and both = the float64 reference."""

from __future__ import annotations

import copy

import pytest
import torch

from clinkd.data import model_inputs, tokenizer_fingerprint
from clinkd.distill import PseudoLabelStore, StoreError, StoreMeta, cache_pseudo_labels
from clinkd.train import KDSettings
from clinkd_kernels.loss import kd_loss_reference
from clinkd_kernels.topk import PseudoLabels, topk_pseudo_labels_reference
from tests.data import tiny
from tests.numerics import assert_close
from tests.train import setup

K, T = 5, 0.7


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kd")
    data = setup.dataset(folder / "data")
    teacher = setup.teacher()
    vocab = len(tiny.processor().tokenizer)
    meta = StoreMeta(
        teacher="tiny-teacher",
        k=K,
        temperature=T,
        vocab_size=vocab,
        tokenizer_hash=tokenizer_fingerprint(tiny.processor().tokenizer),
    )
    assert cache_pseudo_labels(
        teacher, data, setup.collator(), folder / "store", meta=meta, batch_size=3, shard_size=2, progress=False
    )
    return dict(
        folder=folder, data=data, teacher=teacher, meta=meta, store=PseudoLabelStore(folder / "store", expect=meta)
    )


def _shifted_rows(labels):
    """(rows, targets) of the next-token shift, written out independently of the package."""
    nxt = torch.full_like(labels, -100)
    nxt[:, :-1] = labels[:, 1:]
    flat = nxt.reshape(-1)
    rows = (flat != -100).nonzero().squeeze(1)
    return rows, flat[rows]


def _full_logits(model, batch, dtype):
    m = copy.deepcopy(model).to(dtype)
    inputs = {
        k: (v.to(dtype) if k == "pixel_values" else v) for k, v in model_inputs(m, batch).items() if k != "labels"
    }
    with torch.no_grad():
        logits = m(**inputs).logits
    return logits.reshape(-1, logits.shape[-1])


def test_store_holds_the_teachers_top_k(world):
    data, store = world["data"], world["store"]
    batch = setup.collator()([data[i] for i in range(len(data))])
    rows, targets = _shifted_rows(batch["labels"])
    vocab = world["meta"].vocab_size
    ref = topk_pseudo_labels_reference(
        _full_logits(world["teacher"], batch, torch.float64)[rows][:, :vocab], K, temperature=T
    )
    got, got_targets = store.batch(data.ids)
    assert torch.equal(got_targets.long(), targets)
    probs = ref.logprobs.exp()
    # rows whose k-th and (k+1)-th probabilities nearly tie may legitimately order differently in fp32
    full = torch.softmax(_full_logits(world["teacher"], batch, torch.float64)[rows][:, :vocab] / T, -1)
    kth_gap = probs[:, -1] - full.topk(K + 1).values[:, -1]
    clear = kth_gap > 1e-6
    assert int(clear.sum()) >= 0.9 * rows.numel()
    assert torch.equal(got.indices[clear].long(), ref.indices[clear].long())
    for name in ("logprobs", "margin", "residual", "lse"):
        assert_close(f"store {name}", getattr(got, name)[clear], getattr(ref, name)[clear], atol=2e-5)


def _trainers(world, tmp_path, **kd_kw):
    kd = KDSettings(topk=K, temperature=T, alpha=0.6, beta=0.9, curriculum=None, **kd_kw)
    student = setup.student()
    data = world["data"]
    with_store = setup.trainer(student, tmp_path / "a", data, kd=kd, store=world["store"])
    online = setup.trainer(student, tmp_path / "b", data, kd=kd, teacher=world["teacher"])
    return student, with_store, online


@pytest.mark.parametrize("packing", [False, True])
def test_store_loss_equals_online_loss_and_the_reference(world, tmp_path, packing):
    student, with_store, online = _trainers(world, tmp_path)
    data = world["data"]
    batch = setup.collator(packing=packing)([data[i] for i in (4, 1, 6)])
    with torch.no_grad():
        a = with_store.compute_loss(student, dict(batch))
        b = online.compute_loss(student, dict(batch))
    # online recomputes the same top-k from the same teacher: the same loss
    assert_close("store vs online loss", a, b.double(), atol=2e-6)

    # float64 reference from full logits: kd_loss_reference(student logits at the shifted rows, pseudo-labels)
    rows, targets = _shifted_rows(batch["labels"])
    pseudo, _ = world["store"].batch([data.ids[i] for i in (4, 1, 6)])
    p64 = PseudoLabels(pseudo.indices, *(t.double() for t in tuple(pseudo)[1:]))
    ref = kd_loss_reference(
        _full_logits(student, batch, torch.float64)[rows], targets, teacher=p64, temperature=T, alpha=0.6, beta=0.9
    )
    base = kd_loss_reference(
        _full_logits(student, batch, torch.float32)[rows],
        targets,
        teacher=pseudo,
        temperature=T,
        alpha=0.6,
        beta=0.9,
        compute_dtype=torch.float32,
    )
    assert_close("KD loss vs float64 reference", a.reshape(()), ref.reshape(()), base.reshape(()), atol=1e-5)


def test_gradients_match_the_reference(world, tmp_path):
    student, with_store, _ = _trainers(world, tmp_path, t2_scale=True)
    data = world["data"]
    batch = setup.collator()([data[i] for i in (0, 7)])
    student.zero_grad()
    with_store.compute_loss(student, dict(batch)).backward()
    got = student.lm_head.weight.grad.clone()

    ref_model = copy.deepcopy(student).double()
    ref_model.zero_grad()
    inputs = {
        k: (v.double() if k == "pixel_values" else v)
        for k, v in model_inputs(ref_model, batch).items()
        if k != "labels"
    }
    rows, targets = _shifted_rows(batch["labels"])
    logits = ref_model(**inputs).logits.reshape(-1, ref_model.lm_head.weight.shape[0])[rows]
    pseudo, _ = world["store"].batch([data.ids[0], data.ids[7]])
    p64 = PseudoLabels(pseudo.indices, *(t.double() for t in tuple(pseudo)[1:]))
    kd_loss_reference(logits, targets, teacher=p64, temperature=T, alpha=0.6, beta=0.9, t2_scale=True).backward()
    assert_close("lm_head grad", got, ref_model.lm_head.weight.grad, atol=1e-5)


def test_dense_online_teacher_with_curriculum_matches_the_reference(world, tmp_path):
    """topk=None: the full teacher distribution (columns past the student's vocabulary dropped), the
    curriculum's weights from its margins; against kd_loss_reference on float64 logits."""
    from clinkd.train import MarginCurriculum, margin_weights

    curriculum = MarginCurriculum(start_fraction=0.4, warmup_steps=10)
    student, data = setup.student(), world["data"]
    trainer = setup.trainer(
        student,
        tmp_path,
        data,
        teacher=world["teacher"],
        kd=KDSettings(topk=None, temperature=T, alpha=1.0, beta=0.5, curriculum=curriculum),
    )
    trainer.state.global_step = 3
    batch = setup.collator()([data[i] for i in (2, 5, 3)])
    with torch.no_grad():
        got = trainer.compute_loss(student, dict(batch))
    rows, targets = _shifted_rows(batch["labels"])
    vocab = len(tiny.processor().tokenizer)
    t64 = _full_logits(world["teacher"], batch, torch.float64)[rows]
    s64 = _full_logits(student, batch, torch.float64)[rows]
    top2 = torch.softmax(t64[:, :vocab] / T, -1).topk(2).values
    weights = margin_weights(top2[:, 0] - top2[:, 1], curriculum.fraction(3))
    assert int(weights.sum()) < weights.numel()  # the curriculum is active at step 3
    ref = kd_loss_reference(
        s64, targets, teacher_logits=t64, temperature=T, alpha=1.0, beta=0.5, token_weights=weights.double()
    )
    base = kd_loss_reference(
        _full_logits(student, batch, torch.float32)[rows],
        targets,
        teacher_logits=_full_logits(world["teacher"], batch, torch.float32)[rows],
        temperature=T,
        alpha=1.0,
        beta=0.5,
        token_weights=weights,
        compute_dtype=torch.float32,
    )
    assert_close("dense KD loss", got.reshape(()), ref.reshape(()), base.reshape(()), atol=1e-5)


def test_store_that_does_not_fit_the_batch_is_refused(world, tmp_path):
    student = setup.student()
    data = world["data"]
    kd = KDSettings(topk=K, temperature=T, curriculum=None)
    trainer = setup.trainer(
        student, tmp_path, data, kd=kd, store=world["store"], sample_ids=list(reversed(data.ids))
    )  # every sample looks up another's rows
    batch = setup.collator()([data[i] for i in (0, 1)])
    with pytest.raises(StoreError, match="does not match the tokens"):
        trainer.compute_loss(student, batch)
    with pytest.raises(StoreError, match="k=5"):
        setup.trainer(student, tmp_path, data, kd=KDSettings(topk=K + 1), store=world["store"])
    with pytest.raises(ValueError, match="exactly one of teacher"):
        setup.trainer(student, tmp_path, data, kd=kd)


@pytest.mark.parametrize("autocast", [False, True])
def test_trainer_and_patched_forward_share_the_lm_head_operands(tmp_path, monkeypatch, autocast):
    """Both build the (hidden, weight, bias) of linear_kd_loss with ``lm_head_operands``: the autocast
    dtype under autocast (bf16 here, from fp32 weights), else the weight's dtype."""
    import contextlib

    import clinkd.patch
    import clinkd.patch.loss as patch_loss
    import clinkd.train.trainer as trainer_module
    from clinkd.patch import patch_qwen2_vl

    built, dtypes = [], []
    real_operands = patch_loss.lm_head_operands

    def operands(hidden, head):
        built.append(head)
        return real_operands(hidden, head)

    def loss_spy(real):
        def spy(hidden, weight, *args, **kwargs):
            dtypes.append((hidden.dtype, weight.dtype))
            return real(hidden, weight, *args, **kwargs)

        return spy

    monkeypatch.setattr(clinkd.patch, "lm_head_operands", operands)
    monkeypatch.setattr(patch_loss, "lm_head_operands", operands)
    monkeypatch.setattr(patch_loss, "linear_kd_loss", loss_spy(patch_loss.linear_kd_loss))
    monkeypatch.setattr(trainer_module, "linear_kd_loss", loss_spy(trainer_module.linear_kd_loss))

    data = setup.dataset(tmp_path / "data", n=4)
    batch = setup.collator()([data[i] for i in range(3)])
    student = setup.student().train()
    patched = patch_qwen2_vl(copy.deepcopy(student), attention=False, backend="cpu")
    trainer = setup.trainer(student, tmp_path / "out", data)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        losses = [
            trainer.compute_loss(student, dict(batch)),
            patched(**model_inputs(patched, batch), use_cache=False).loss,
        ]
    expected = torch.bfloat16 if autocast else torch.float32
    assert built == [student.lm_head, patched.lm_head]
    assert dtypes == [(expected, expected)] * 2
    torch.testing.assert_close(losses[0].float(), losses[1].float(), rtol=1e-2 if autocast else 1e-5, atol=0)


@pytest.mark.parametrize("kd_only", [False, True])
def test_released_form_equals_the_released_total(world, tmp_path, kd_only):
    """KDSettings(form="released") (config loss_form: released) is the released trainer's total on the
    student's full logits: (alpha·Σ_tokens KL_T + mean CE) / (1 + alpha), or Σ KL_T alone with beta 0."""
    from clinkd.train.released import released_loss_reference

    kd = KDSettings(topk=None, temperature=T, alpha=0.6, beta=0.0 if kd_only else 1.0, curriculum=None, form="released")
    student, data = setup.student(), world["data"]
    trainer = setup.trainer(student, tmp_path / "r", data, kd=kd, teacher=world["teacher"])
    batch = setup.collator()([data[i] for i in (2, 5)])
    with torch.no_grad():
        got = trainer.compute_loss(student, dict(batch))
    rows, targets = _shifted_rows(batch["labels"])
    want = released_loss_reference(
        _full_logits(student, batch, torch.float64)[rows],
        _full_logits(world["teacher"], batch, torch.float64)[rows],
        targets,
        temperature=T,
        alpha=0.6,
        kd_only=kd_only,
    )
    base = released_loss_reference(
        _full_logits(student, batch, torch.float32)[rows],
        _full_logits(world["teacher"], batch, torch.float32)[rows],
        targets,
        temperature=T,
        alpha=0.6,
        kd_only=kd_only,
    )
    assert_close("released form", got.reshape(()), want, base, atol=1e-5 * float(want.abs()))
    with pytest.raises(ValueError, match="released loss form has beta 1"):
        KDSettings(form="released", beta=0.5)
    with pytest.raises(ValueError, match="loss form must be one of"):
        KDSettings(form="mean")
