"""clinkd inside TRL 1.16's own trainers, on the CPU, with tiny random-weight Qwen2-VL models.

    bash scripts/overlay_venv.sh .venv-integration/trl -r integration/trl/requirements.txt
    .venv-integration/trl/bin/python -m pytest integration/trl -q

Everything is built here: an offline processor (byte-level BPE tokenizer + Qwen2-VL image processor),
random RGB images, a conversational image+text data set in the format TRL documents for VLMs
(``messages`` / ``images`` for SFT, ``prompt`` / ``images`` for distillation), and models from a config
(text decoder head_dim 64, the vision tower head_dim 64, so clinkd's fused attention serves both).

SFT: ``trl.SFTTrainer`` stock vs. with ``clinkd.apply_to_transformers(mcg_rope={"modality_gap": 1, ...},
backend="cpu")`` — the same per-step losses. Gap 1 is the stock M-RoPE for images, so the two runs
compute the same function; what differs is the kernels (clinkd's rotation + attention, and with
``ClinkdLossSFTTrainer`` clinkd's loss), which sum in another order: per-step losses agree to
rel 1e-4, far below the loss's own movement over the run, and a run at gap 2 (other positions) is
shown to differ by much more than that.

Distillation: ``trl.DistillationTrainer`` (TRL 1.16's distillation entry point, on-policy) with beta=0,
its forward KL, against ``ClinkdDistillationTrainer`` (the same trainer, loss by
``clinkd_kernels.linear_kd_loss``): the same loss and student gradients on one generated batch, both
equal to a float64 reference written out from the formula, then the same per-step losses over a
few training steps, stock models + TRL's loss vs. clinkd-patched models + clinkd's loss.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from trl import DistillationConfig, DistillationTrainer, SFTConfig, SFTTrainer

import clinkd
import clinkd.patch.attention as attention_mod
import clinkd.patch.loss as loss_mod
import clinkd.patch.positions as positions_mod
import clinkd.patch.vision as vision_mod
import clinkd_kernels
from clinkd.data.offline_processor import DEFAULT_SYSTEM_PROMPT, build_offline_processor, special_token_ids
from clinkd.patch import patch_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))  # clinkd_trl.py, beside this file
from clinkd_trl import ClinkdDistillationTrainer, ClinkdLossSFTTrainer  # noqa: E402

SEED = 0
GAP1 = {"modality_gap": 1, "vision_stride": 1}
# Per-step losses of the stock and the patched run: fp32 throughout; the fused kernels sum in another order
# than SDPA / TRL's chunked head (differences ~1e-7 relative per op), compounded over a few optimizer steps.
LOSS_RTOL = 1e-4

QUESTIONS = [
    "What organ is shown?",
    "Where is the lesion?",
    "Describe the region.",
    "What does this scan show?",
    "Is there a nodule?",
    "Which side is affected?",
]
ANSWERS = [
    "the liver",
    "the left kidney",
    "a nodule in the right lung",
    "a normal spleen",
    "a polyp in the colon",
    "the right side",
    "no lesion is visible",
    "an enlarged heart",
]
IMAGE_SIZES = [(32, 32), (40, 24), (16, 48), (28, 36), (24, 24)]


# --------------------------------------------------------------------------------------------------
# data, processor, models


def _processor(padding_side: str = "right"):
    corpus = QUESTIONS + ANSWERS + [DEFAULT_SYSTEM_PROMPT, "user", "assistant", "system"]
    processor = build_offline_processor(
        corpus * 3,
        vocab_size=320,
        patch_size=4,
        merge_size=2,
        temporal_patch_size=1,
        min_pixels=16 * 16,
        max_pixels=32 * 32,
    )
    processor.tokenizer.padding_side = padding_side
    return processor


def _image(i: int) -> Image.Image:
    w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
    pixels = np.random.default_rng(1000 + i).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _user_turn(i: int) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}


def sft_dataset(n: int = 8) -> Dataset:
    """TRL's conversational VLM format: "messages" with an image placeholder part, and "images"."""
    rows = [
        {
            "messages": [
                _user_turn(i),
                {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[i % len(ANSWERS)]}]},
            ],
            "images": [_image(i)],
        }
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def prompt_dataset(n: int = 8) -> Dataset:
    """DistillationTrainer's format: a conversational "prompt" (the completion is generated) and "images"."""
    return Dataset.from_list([{"prompt": [_user_turn(i)], "images": [_image(i)]} for i in range(n)])


def tiny_qwen2_vl(processor, *, hidden: int = 128, layers: int = 2, seed: int = 0, init_std: float = 0.1):
    """Random weights from a seed; text head_dim 64 (hidden / 64 heads), vision head_dim 64."""
    ids = special_token_ids(processor.tokenizer)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(processor.tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=1,
            max_position_embeddings=1024,
            bos_token_id=None,
            pad_token_id=ids["pad_token_id"],
            eos_token_id=ids["eos_token_id"],
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[8, 12, 12]),
        ),
        vision_config=dict(
            depth=1,
            embed_dim=128,
            hidden_size=hidden,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=1,
            in_channels=3,
            mlp_ratio=2,
        ),
        **{k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")},
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).float()
    with torch.no_grad():  # wider than HF's 0.02, so the distributions are not near-uniform
        for name, p in model.named_parameters():
            if p.dim() > 1 and "visual" not in name:
                p.normal_(0.0, init_std)
    return model


def _common_args(tmp_path, name: str, max_steps: int) -> dict:
    return dict(
        output_dir=str(tmp_path / name),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        logging_steps=1,
        seed=SEED,
        data_seed=SEED,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
        warmup_steps=0,
    )


def _step_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# --------------------------------------------------------------------------------------------------
# proof the patch ran: counters on the functions the patched methods call


@pytest.fixture
def calls(monkeypatch):
    counts = {"positions": 0, "attention": 0, "vision_attention": 0, "loss": 0, "kd_loss": 0}

    def spy(key, fn):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(positions_mod, "mcg_rope_index", spy("positions", positions_mod.mcg_rope_index))
    monkeypatch.setattr(attention_mod, "mcg_rope_attention", spy("attention", attention_mod.mcg_rope_attention))
    monkeypatch.setattr(vision_mod, "mcg_rope_attention", spy("vision_attention", vision_mod.mcg_rope_attention))
    monkeypatch.setattr(loss_mod, "linear_kd_loss", spy("loss", loss_mod.linear_kd_loss))  # the patched forward's
    monkeypatch.setattr(clinkd_kernels, "linear_kd_loss", spy("kd_loss", clinkd_kernels.linear_kd_loss))
    return counts


@pytest.fixture(autouse=True)
def stock_transformers_after():
    yield
    assert clinkd.revert_transformers() == [], "a test left transformers patched"


class patched:
    """``with patched(mcg_rope): ...`` — apply_to_transformers on entry, revert_transformers on exit."""

    def __init__(self, mcg_rope=GAP1):
        self.mcg_rope = mcg_rope

    def __enter__(self):
        self.settings = clinkd.apply_to_transformers(mcg_rope=self.mcg_rope, backend="cpu")
        return self.settings

    def __exit__(self, *exc):
        clinkd.revert_transformers()


def _reset(calls):
    for key in calls:
        calls[key] = 0


# --------------------------------------------------------------------------------------------------
# 1. SFTTrainer


SFT_STEPS = 6


def _sft_run(tmp_path, name, trainer_cls=SFTTrainer, steps=SFT_STEPS):
    processor = _processor()
    model = tiny_qwen2_vl(processor)
    args = SFTConfig(**_common_args(tmp_path, name, steps), learning_rate=2e-3, max_length=None)
    trainer = trainer_cls(model=model, args=args, train_dataset=sft_dataset(), processing_class=processor)
    trainer.train()
    return trainer, model


def test_sft_trainer_stock_vs_clinkd(tmp_path, calls):
    stock_trainer, stock_model = _sft_run(tmp_path, "stock")
    stock = _step_losses(stock_trainer)
    assert patch_settings(type(stock_model)) is None
    assert calls == dict.fromkeys(calls, 0), f"stock run reached clinkd: {calls}"  # the counters only see clinkd

    # clinkd at gap 1, TRL's own loss (SFTTrainer's fused lm_head runs the backbone, then TRL's chunked log-probs)
    with patched() as settings:
        assert settings["Qwen2-VL"].mcg_rope == clinkd.MCGRope(1, 1)
        trl_loss_trainer, model = _sft_run(tmp_path, "clinkd")
        assert patch_settings(type(model)) is not None and patch_settings(model).attention
        with_trl_loss = _step_losses(trl_loss_trainer)
        counts_trl_loss = dict(calls)
        _reset(calls)
        # ... and with clinkd's fused loss (the model's own forward) instead of TRL's head
        trainer, _ = _sft_run(tmp_path, "clinkd-loss", trainer_cls=ClinkdLossSFTTrainer)
        with_clinkd_loss = _step_losses(trainer)
        counts_clinkd_loss = dict(calls)
        _reset(calls)

    print(
        f"\nSFT per-step losses\n  stock              {stock}\n  clinkd, TRL loss   {with_trl_loss}\n"
        f"  clinkd, clinkd loss {with_clinkd_loss}\n  calls {counts_trl_loss} / {counts_clinkd_loss}"
    )
    assert len(stock) == len(with_trl_loss) == len(with_clinkd_loss) == SFT_STEPS
    assert all(math.isfinite(x) for x in stock)
    movement = max(stock) - min(stock)
    assert movement > 0.05 * stock[0], f"the loss hardly moved: {stock}"
    # TRL's own metrics from its fused head (SFTTrainer never reads outputs.logits): the same with clinkd
    for key in ("entropy", "mean_token_accuracy"):
        ref = [e[key] for e in stock_trainer.state.log_history if key in e]
        got = [e[key] for e in trl_loss_trainer.state.log_history if key in e]
        assert len(ref) == len(got) == SFT_STEPS
        assert all(abs(a - b) <= LOSS_RTOL * abs(a) + 1e-6 for a, b in zip(ref, got, strict=True)), (key, ref, got)
    for name, run in (("TRL loss", with_trl_loss), ("clinkd loss", with_clinkd_loss)):
        for step, (a, b) in enumerate(zip(stock, run, strict=True)):
            assert abs(a - b) <= LOSS_RTOL * abs(a), f"{name}, step {step}: stock {a} vs clinkd {b} ({stock} / {run})"

    # Every step ran clinkd's positions, decoder attention (per layer) and vision attention; the loss kernel
    # only where the model's own forward computes the loss.
    for counts in (counts_trl_loss, counts_clinkd_loss):
        assert counts["positions"] >= SFT_STEPS and counts["attention"] >= 2 * SFT_STEPS
        assert counts["vision_attention"] >= SFT_STEPS
    assert counts_trl_loss["loss"] == 0, "SFTTrainer's fused head is expected to bypass the model's forward"
    assert counts_clinkd_loss["loss"] == SFT_STEPS


def test_sft_positions_reach_the_decoder(tmp_path, calls):
    """Gap 2 (the ClinKD setting) changes the positions of the text after each image: through TRL's
    path the first step's loss then differs from the stock one by far more than LOSS_RTOL — the
    positions TRL's fused head runs the decoder with are clinkd's."""
    stock = _step_losses(_sft_run(tmp_path, "stock", steps=1)[0])
    with patched({"modality_gap": 2, "vision_stride": 1}):
        gap2 = _step_losses(_sft_run(tmp_path, "gap2", steps=1)[0])
    assert calls["positions"] >= 1
    print(f"\nfirst-step loss: stock {stock[0]}, gap 2 {gap2[0]}")
    assert abs(gap2[0] - stock[0]) > 20 * LOSS_RTOL * abs(stock[0])


# --------------------------------------------------------------------------------------------------
# 2. Distillation: DistillationTrainer (TRL's loss) vs ClinkdDistillationTrainer (clinkd's loss)
#
# Both compute, over the completion tokens i of the batch (completion_mask 1: the prompt, its image
# and the padding after an EOS have no loss), with z_s,i / z_t,i the student's / teacher's lm_head logits
# at the position that predicts token i and T = DistillationConfig.temperature:
#
#     loss = Σ_i Σ_v p_t,i(v) · (log p_t,i(v) − log p_s,i(v)) / N,   p_·,i = softmax(z_·,i / T),
#     N = num_items_in_batch = Σ completion_mask (one process, no gradient accumulation)
#
# TRL: DistillationTrainer._compute_loss → _chunked_divergence_loss(beta=0.0) → ChunkedDivergenceFunction,
# whose beta == 0 branch is t_weighted_gap / t_sum − log Z_t + log Z_s = Σ_v p_t (z_t − z_s)/T − log Z_t +
# log Z_s = KL(p_t ‖ p_s); sum over the valid rows / num_items_in_batch; no T² factor.
# clinkd: linear_kd_loss(h_s, W_s, labels, teacher_hidden=h_t, teacher_weight=W_t, temperature=T,
# alpha=1, beta=0, reduction="sum") / N — (α·KL_T(teacher ‖ student) + β·CE)/(α + β) summed over the rows
# whose label is not -100 (labels: the completion ids, -100 where completion_mask is 0), t2_scale off.

KD_TEMPERATURE = 0.8
KD_STEPS = 4


def _distillation_trainer(tmp_path, name, trainer_cls, *, steps=KD_STEPS, suppress_placeholders=False):
    processor = _processor(padding_side="left")  # DistillationTrainer pads prompts on the left
    student = tiny_qwen2_vl(processor, seed=0)
    teacher = tiny_qwen2_vl(processor, hidden=192, layers=3, seed=1).eval()
    extra = {}
    if suppress_placeholders:  # what ClinkdDistillationTrainer adds by itself; given to both runs alike
        extra["generation_kwargs"] = {"suppress_tokens": [student.config.image_token_id, student.config.video_token_id]}
    args = DistillationConfig(
        **_common_args(tmp_path, name, steps),
        learning_rate=2e-3,
        beta=0.0,
        temperature=KD_TEMPERATURE,
        max_completion_length=8,
        **extra,
    )
    trainer = trainer_cls(
        model=student, teacher_model=teacher, args=args, train_dataset=prompt_dataset(), processing_class=processor
    )
    return trainer, student, teacher


def _reference_forward_kl(trainer, student, teacher, inputs) -> torch.Tensor:
    """The formula above in float64 with the full [rows, V] logits."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    keep = inputs["completion_ids"].size(1)
    mm = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids") if k in inputs}
    with torch.no_grad():
        h_s = trainer._get_last_hidden_state(student, input_ids, mask, keep, **mm).double()
        h_t = trainer._get_last_hidden_state(teacher, input_ids, mask, keep, **mm).double()
    z_s = h_s @ student.lm_head.weight.double().T / KD_TEMPERATURE
    z_t = h_t @ teacher.lm_head.weight.double().T / KD_TEMPERATURE
    log_ps, log_pt = z_s.log_softmax(-1), z_t.log_softmax(-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # [B, K]
    valid = inputs["completion_mask"].bool()
    return kl[valid].sum() / valid.sum()


def test_distillation_loss_and_gradients_one_batch(tmp_path, calls):
    with patched():
        trainer, student, teacher = _distillation_trainer(tmp_path, "one-batch", ClinkdDistillationTrainer)
        assert patch_settings(student) is not None and patch_settings(teacher) is not None
        # TRL suppresses the image placeholder; the subclass adds the video one (see clinkd_trl)
        assert student.config.video_token_id in trainer.generation_config.suppress_tokens
        assert student.config.image_token_id in trainer.generation_config.suppress_tokens
        trainer.model.train()
        batch = next(iter(trainer.get_train_dataloader()))
        inputs = trainer._prepare_inputs(batch)  # TRL generates the completions (student, sampled)
        assert int(inputs["num_items_in_batch"]) == int(inputs["completion_mask"].sum()) > 0
        # End the last row's completion early, as TRL writes a completion that stopped at an EOS: padding
        # after it, completion_mask 0 there, so the masking of both losses is exercised on this batch.
        cut = 3
        inputs["completion_ids"][-1, cut:] = trainer._tokenizer.pad_token_id
        inputs["completion_mask"][-1, cut:] = 0
        inputs["num_items_in_batch"] = n = inputs["completion_mask"].sum()
        assert inputs["completion_mask"].sum(1).tolist()[-1] == cut < inputs["completion_ids"].size(1)
        assert "pixel_values" in inputs and "mm_token_type_ids" in inputs
        params = [p for p in student.parameters() if p.requires_grad]

        trl_loss, _, trl_n = DistillationTrainer._compute_loss(trainer, student, inputs, n)
        trl_grads = torch.autograd.grad(trl_loss, params, allow_unused=True)
        assert calls["kd_loss"] == 0
        ck_loss, _, ck_n = trainer._compute_loss(student, inputs, n)
        assert calls["kd_loss"] == 1
        ck_grads = torch.autograd.grad(ck_loss, params, allow_unused=True)
        reference = _reference_forward_kl(trainer, student, teacher, inputs)

    print(
        f"\none batch ({int(n)} completion tokens): TRL {trl_loss.item():.8f}, clinkd {ck_loss.item():.8f}, "
        f"float64 reference {reference.item():.8f}"
    )
    assert int(trl_n) == int(ck_n) == int(n)
    assert reference > 1e-2  # a real divergence, not near zero
    assert abs(trl_loss.item() - reference.item()) <= 1e-5 * reference.item()
    assert abs(ck_loss.item() - reference.item()) <= 1e-5 * reference.item()
    worst = 0.0
    for _p, g_trl, g_ck in zip(params, trl_grads, ck_grads, strict=True):
        assert (g_trl is None) == (g_ck is None)
        if g_trl is None:
            continue
        scale = g_trl.abs().max().item()
        worst = max(worst, (g_trl - g_ck).abs().max().item() / max(scale, 1e-12))
        torch.testing.assert_close(g_ck, g_trl, rtol=1e-4, atol=1e-4 * scale + 1e-9)
    assert any(g is not None and g.abs().sum() > 0 for g in ck_grads)
    print(f"student gradients: worst max|g_clinkd - g_TRL| / max|g_TRL| over {len(params)} tensors = {worst:.2e}")


def _record_completions(trainer):
    seen = []
    original = trainer._generate_and_score_completions

    def recording(inputs):
        out = original(inputs)
        seen.append(out["completion_ids"].tolist())
        return out

    trainer._generate_and_score_completions = recording
    return seen


def test_distillation_training_stock_vs_clinkd(tmp_path, calls):
    stock_trainer, _, _ = _distillation_trainer(tmp_path, "stock", DistillationTrainer, suppress_placeholders=True)
    stock_completions = _record_completions(stock_trainer)
    stock_trainer.train()
    stock = _step_losses(stock_trainer)
    assert calls == dict.fromkeys(calls, 0)

    with patched():
        trainer, student, _ = _distillation_trainer(
            tmp_path, "clinkd", ClinkdDistillationTrainer, suppress_placeholders=True
        )
        completions = _record_completions(trainer)
        trainer.train()
        assert patch_settings(student) is not None
    ours = _step_losses(trainer)
    print(
        f"\ndistillation per-step losses\n  stock + TRL loss      {stock}\n  clinkd + clinkd loss  {ours}\n"
        f"  calls {calls}"
    )
    assert completions == stock_completions, "the two runs sampled different completions"
    assert len(stock) == len(ours) == KD_STEPS and all(math.isfinite(x) for x in stock)
    assert max(stock) - min(stock) > 0.05 * stock[0], f"the loss hardly moved: {stock}"
    for step, (a, b) in enumerate(zip(stock, ours, strict=True)):
        assert abs(a - b) <= LOSS_RTOL * abs(a), f"step {step}: stock {a} vs clinkd {b} ({stock} / {ours})"
    assert calls["kd_loss"] == KD_STEPS and calls["positions"] >= KD_STEPS and calls["attention"] > 0
