"""One ClinKD distillation training step (forward + backward) end to end, clinkd vs stock transformers.

A Qwen2-VL-2B-shaped student learns from a Qwen2-VL-7B-shaped teacher on a multimodal batch (random
weights, one image per sequence, labels on the text tokens). Two settings, one group each:

* ``online``: the teacher runs in the step (no gradients) with its dense distribution.
  - ``stock``  stock transformers (SDPA attention) for both models, full [tokens × vocab] logits of
               both, and the released trainer's loss: (α·KD + CE) / (1 + α), KD = KL(teacher ‖ student)
               at T = 0.5 *summed* over the label positions, CE the mean (docs/method.md), in plain
               PyTorch (``clinkd.train.released.released_loss_reference``; the masking is done on
               shifted labels, fixing the released off-by-one, which costs nothing).
  - ``clinkd`` what ``ClinKDTrainer.compute_loss`` runs for that loss (``KDSettings(form="released")``):
               the patched student (fused attention, fused loss), the teacher's final hidden states
               (fused attention) and ``linear_kd_loss`` with the teacher's lm_head fused. Timed after
               the curriculum's warm-up, when every token is in the KD term as in the stock loss
               (during the warm-up the dense teacher's margins add one more pass over its lm_head).
* ``stored``: the teacher's top-64 pseudo-labels come from a ``PseudoLabelStore`` on disk.
  - ``stock``  stock student, full logits, clinkd's loss written in plain PyTorch (``kd_loss_reference``).
  - ``clinkd`` ``ClinKDTrainer.compute_loss`` with the store.

Both sides compute the same value: the patched student gets MCG-RoPE indices at gap 1 (the stock
positions, computed by clinkd's index op: the same kernels as any gap), and before a clinkd step is
timed its loss is checked against the stock step's on the same batch (fp32: relative 1e-4; bf16: 3e-2).

Shapes: on CUDA the real ones in bf16 (2B: hidden 1536, 28 layers, 12/2 heads, vocab 151936, vision
depth 32 × 1280; 7B: hidden 3584, 28 layers, 28/4 heads, vocab 152064), 2 sequences of 2048 tokens
with a 448×448 image each (256 tokens). On CPU a scaled-down fp32 pair (2 layers, hidden 256 / 512,
real vocabularies, depth-1 vision tower), 2 sequences of 256 tokens with a 112×112 image each.

Reported in ``extra_info``: ``tokens`` (tokens/s = tokens / median time, in the rendered table),
``peak_bytes`` (the most memory the step held above its inputs, benchmarks/memory.py; clinkd's CPU
buffer cache emptied first, so its lm_head buffers count as made in the step) and the floor:
the step's matmul FLOPs (student forward + backward = 3× its forward, teacher forward in the online
setting; lm_head only on the supervised rows) at the device's measured matmul rate.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from benchmarks.conftest import sync
from benchmarks.floors import compute_floor_s, qwen2_vl_matmul_flops, record
from benchmarks.memory import peak_bytes
from clinkd_kernels import empty_cpu_cache

T, ALPHA, BETA, TOPK = 0.5, 0.5, 1.0, 64
IMAGE, VIDEO, VISION_START, VISION_END = 151655, 151656, 151652, 151653  # Qwen2-VL's token ids


def _text(hidden, inter, layers, heads, kv, vocab, section):
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=32768,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=section),
    )


def _vision(depth, embed, heads, hidden):
    return dict(
        depth=depth,
        embed_dim=embed,
        num_heads=heads,
        mlp_ratio=4,
        hidden_size=hidden,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )


SETUPS = {
    # device: (student text, student vision, teacher text, teacher vision, sequences, tokens each, image side)
    "cuda": (
        _text(1536, 8960, 28, 12, 2, 151936, [16, 24, 24]),
        _vision(32, 1280, 16, 1536),
        _text(3584, 18944, 28, 28, 4, 152064, [16, 24, 24]),
        _vision(32, 1280, 16, 3584),
        2,
        2048,
        448,
        torch.bfloat16,
    ),
    "cpu": (
        _text(256, 768, 2, 4, 2, 151936, [8, 12, 12]),
        _vision(1, 64, 2, 256),
        _text(512, 1536, 2, 8, 2, 152064, [8, 12, 12]),
        _vision(1, 64, 2, 512),
        2,
        256,
        112,
        torch.float32,
    ),
}


def _model(text: dict, vision: dict, device: str, dtype: torch.dtype):
    """A random-weight Qwen2VLForConditionalGeneration, initialised directly on ``device`` in ``dtype``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Qwen2VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)


def _batch(n_seq: int, seq_len: int, side: int, vocab: int, device: str, dtype: torch.dtype) -> dict:
    """n_seq sequences of seq_len tokens: 5 text tokens, one side×side image, text; labels on the text."""
    g = torch.Generator().manual_seed(0)
    grid = side // 14
    n_image = grid * grid // 4
    ids = torch.randint(3, 150000, (n_seq, seq_len), generator=g)
    ids[:, 5] = VISION_START
    ids[:, 6 : 6 + n_image] = IMAGE
    ids[:, 6 + n_image] = VISION_END
    image = ids == IMAGE
    batch = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=image.long(),
        image_grid_thw=torch.tensor([[1, grid, grid]] * n_seq),
        pixel_values=torch.randn(n_seq * grid * grid, 3 * 2 * 14 * 14, generator=g).to(dtype),
        labels=ids.masked_fill(image | (ids == VISION_START) | (ids == VISION_END), -100),
        sample_index=torch.arange(n_seq),
    )
    return {k: v.to(device) for k, v in batch.items()}


class Setup:
    """The models, the batch and the pseudo-label store of one device (built once: the 7B is slow to make)."""

    def __init__(self, device: str, tmp):
        from clinkd.distill.cache import rows_per_sample, split_rows, teacher_pseudo_labels, write_store
        from clinkd.distill.store import PseudoLabelStore, StoreMeta

        s_text, s_vision, t_text, t_vision, n_seq, seq_len, side, dtype = SETUPS[device]
        self.device, self.dtype = device, dtype
        torch.manual_seed(0)
        self.student = _model(s_text, s_vision, device, dtype).train()
        self.teacher = _model(t_text, t_vision, device, dtype).eval().requires_grad_(False)
        self.batch = _batch(n_seq, seq_len, side, s_text["vocab_size"], device, dtype)
        self.ids = [f"sample-{i}" for i in range(n_seq)]
        self.vocab = s_text["vocab_size"]
        self.stock_values: dict[str, float] = {}

        meta = StoreMeta(
            teacher="random-7b-shaped", k=TOPK, temperature=T, vocab_size=self.vocab, tokenizer_hash="none"
        )
        store_dir = tmp / f"store-{device}"

        def compute(indices):
            labels, targets = teacher_pseudo_labels(
                self.teacher, self.batch, k=TOPK, temperature=T, vocab_size=self.vocab
            )
            return split_rows(labels.to("cpu"), targets.to("cpu"), rows_per_sample(self.batch))

        write_store(store_dir, meta, self.ids, compute, batch_size=n_seq, progress=False)
        self.store = PseudoLabelStore(store_dir, expect=meta)

        patches = [side // 14 * (side // 14)] * n_seq
        rows = sum(rows_per_sample(self.batch))
        shape = dict(seq_lens=[seq_len] * n_seq, image_patches=patches, supervised_rows=rows)
        self.student_flops = qwen2_vl_matmul_flops(s_text, s_vision, **shape)
        self.teacher_flops = qwen2_vl_matmul_flops(t_text, t_vision, **shape)
        self.tokens = n_seq * seq_len
        self.shape = f"{n_seq}x{seq_len} tokens, {side}px images"

    def trainer(self, teacher: bool, tmp):
        """A ClinKDTrainer around the (patched) student: the step is its compute_loss + backward."""
        from transformers import TrainingArguments

        from clinkd.train.trainer import ClinKDTrainer, KDSettings

        args = TrainingArguments(
            output_dir=str(tmp / "trainer"),
            report_to="none",
            use_cpu=self.device == "cpu",
            per_device_train_batch_size=1,
        )
        kd = KDSettings(
            topk=None if teacher else TOPK,
            temperature=T,
            alpha=ALPHA,
            beta=BETA,
            form="released" if teacher else "clinkd",
        )
        extra = dict(teacher=self.teacher) if teacher else dict(store=self.store, sample_ids=self.ids)
        trainer = ClinKDTrainer(model=self.student, args=args, kd=kd, **extra)
        trainer.state.global_step = kd.curriculum.warmup_steps  # past the warm-up: the stock loss's work
        return trainer


_SETUPS: dict[str, Setup] = {}


@pytest.fixture
def setup(device, tmp_path_factory):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if device not in _SETUPS:
        _SETUPS.clear()  # one device's models at a time
        _SETUPS[device] = Setup(device, tmp_path_factory.mktemp("train-step"))
    return _SETUPS[device]


@contextlib.contextmanager
def _patched(setup: Setup):
    """The student with MCG-RoPE indices (gap 1: the stock positions) + fused attention + fused loss, and
    the teacher with fused attention (stock positions) for the duration of one benchmark; both restored
    afterwards."""
    from clinkd.patch import MCGRope, patch_qwen2_vl, unpatch_qwen2_vl

    patch_qwen2_vl(setup.student, mcg_rope=MCGRope(modality_gap=1))
    patch_qwen2_vl(setup.teacher, mcg_rope=None)
    try:
        yield
    finally:
        unpatch_qwen2_vl(setup.student)
        unpatch_qwen2_vl(setup.teacher)


def _stock_step(setup: Setup, teacher_mode: str):
    from clinkd.patch import next_token_targets
    from clinkd.train.released import released_loss_reference
    from clinkd_kernels.loss import kd_loss_reference

    inputs = {k: v for k, v in setup.batch.items() if k not in ("labels", "sample_index")}
    rows, targets = next_token_targets(setup.batch["labels"])

    def step():
        student_logits = setup.student(**inputs, use_cache=False).logits.flatten(0, 1)[rows]
        if teacher_mode == "online":
            with torch.no_grad():
                teacher_logits = setup.teacher(**inputs, use_cache=False).logits.flatten(0, 1)[rows]
            return released_loss_reference(student_logits, teacher_logits, targets, temperature=T, alpha=ALPHA)
        pseudo, _ = setup.store.batch(setup.ids)
        return kd_loss_reference(
            student_logits, targets, teacher=pseudo.to(setup.device), temperature=T, alpha=ALPHA, beta=BETA
        )

    return step


def _stock_value(setup: Setup, teacher_mode: str) -> float:
    """The stock step's loss on the benchmark batch (once per setting), the value clinkd must reproduce."""
    if teacher_mode not in setup.stock_values:
        with torch.no_grad():
            setup.stock_values[teacher_mode] = float(_stock_step(setup, teacher_mode)())
    return setup.stock_values[teacher_mode]


@pytest.mark.parametrize("teacher_mode", ["online", "stored"])
@pytest.mark.parametrize("impl", ["clinkd", "stock"])
def test_train_step(benchmark, setup, device, impl, teacher_mode, tmp_path):
    want = _stock_value(setup, teacher_mode)  # before patching: the stock models
    patch = _patched(setup) if impl == "clinkd" else contextlib.nullcontext()
    with patch:
        if impl == "clinkd":
            trainer = setup.trainer(teacher_mode == "online", tmp_path)
            loss_fn = lambda: trainer.compute_loss(setup.student, dict(setup.batch))  # noqa: E731
            with torch.no_grad():
                got = float(loss_fn())
            tol = 1e-4 if setup.dtype == torch.float32 else 3e-2
            assert abs(got - want) <= tol * abs(want), f"clinkd loss {got} vs stock {want}: not the same problem"
        else:
            loss_fn = _stock_step(setup, teacher_mode)

        def run():
            setup.student.zero_grad(set_to_none=True)
            loss_fn().backward()
            sync(device)

        run()  # warm-up: Triton compiles, allocator pools
        setup.student.zero_grad(set_to_none=True)
        empty_cpu_cache()  # clinkd's kept lm_head buffers count as the step's, as freshly made ones would
        peak = peak_bytes(run, device)
        flops = 3 * setup.student_flops + (setup.teacher_flops if teacher_mode == "online" else 0.0)
        benchmark.group = (
            f"train_step {device} {teacher_mode} teacher, Qwen2-VL "
            f"{'2B/7B' if device == 'cuda' else 'scaled-down'} shapes, {setup.shape}, "
            f"{str(setup.dtype).replace('torch.', '')} fwd+bwd"
        )
        record(
            benchmark,
            floor_s=compute_floor_s(flops, device, setup.dtype),
            flops=flops,
            op="train_step",
            impl=impl,
            device=device,
            tokens=setup.tokens,
            peak_bytes=peak,
            peak_gib=None if peak is None else round(peak / 2**30, 3),
        )
        benchmark.pedantic(run, rounds=5, warmup_rounds=0, iterations=1)
        setup.student.zero_grad(set_to_none=True)
