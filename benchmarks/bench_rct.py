"""The generation of an RCT round, clinkd vs a plain transformers ``generate()`` loop: generated tokens/s.

Generation is RCT's whole cost (docs/method.md): a round answers its questions greedily and samples
candidates for the wrong ones. Both sides answer the same 16 multimodal prompts (one image each, the
prompts of different lengths) with the same MCG-RoPE-patched Qwen2-VL model, greedy, 32 new tokens:

* ``clinkd``  what ``clinkd.rct.round`` runs: ``clinkd.eval.predict.generate_texts`` — the prompts
              left-padded into one batch, one ``generate()`` with the KV cache (prefill through the fused
              attention on CUDA);
* ``loop``    the plain transformers loop a user writes: ``generate()`` on each prompt alone, KV cache.

Before timing, both must generate the same tokens for every prompt (a peer that answers differently
solves another problem). ``extra_info["tokens"]`` is the number of generated tokens (tokens/s in the
rendered table) and the floor is the matmul work of the whole generation — every prompt's prefill and
every decoded token through the text model, the lm_head on the generated rows, the vision tower once —
at the device's measured matmul rate (a compute floor: decoding a small batch is bound by reading the
weights, which the floor does not count, so the distance to it is large by nature).

Shapes: on CUDA a Qwen2-VL-2B-shaped model in bf16 with 448×448 images; on CPU a scaled-down fp32
model (2 layers, hidden 256, head_dim 64) with 56×56 images. Weights are random but drawn wide
(std 0.1) so that greedy decoding has no near-ties that batching could flip.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import sync
from benchmarks.floors import compute_floor_s, qwen2_vl_matmul_flops, record

PROMPTS, NEW_TOKENS = 16, 32
IMAGE, VIDEO, VISION_START, VISION_END, EOS, PAD = 151655, 151656, 151652, 151653, 151645, 151643


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
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=None,
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


SETUPS = {  # device: (text, vision, image side, prompt text lengths, dtype)
    "cuda": (
        _text(1536, 8960, 28, 12, 2, 151936, [16, 24, 24]),
        _vision(32, 1280, 16, 1536),
        448,
        (24, 120),
        torch.bfloat16,
    ),
    "cpu": (_text(256, 512, 2, 4, 2, 151936, [8, 12, 12]), _vision(1, 64, 2, 256), 56, (8, 40), torch.float32),
}


class Tokenizer:
    """The two things ``generate_texts`` needs of a tokenizer: the special ids, and decode."""

    def __init__(self):
        self.vocab = {
            "<|endoftext|>": PAD,
            "<|im_end|>": EOS,
            "<|image_pad|>": IMAGE,
            "<|video_pad|>": VIDEO,
            "<|vision_start|>": VISION_START,
            "<|vision_end|>": VISION_END,
        }
        self.pad_token, self.unk_token_id = "<|endoftext|>", None

    def convert_tokens_to_ids(self, token):
        return self.vocab[token]

    def get_vocab(self):
        return self.vocab

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


class Setup:
    def __init__(self, device: str):
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        from clinkd.patch import patch_qwen2_vl

        text, vision, side, (short, long), dtype = SETUPS[device]
        config = Qwen2VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=IMAGE,
            video_token_id=VIDEO,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration(config).to(dtype).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() > 1 and "visual" not in name:
                    p.normal_(0.0, 0.1)
        self.model = patch_qwen2_vl(model, mcg_rope={"modality_gap": 2, "vision_stride": 1}, attention=device == "cuda")
        self.device, self.dtype = device, dtype
        g = torch.Generator().manual_seed(1)
        grid = side // 14
        n_image = grid * grid // 4
        self.prompts = []
        for i in range(PROMPTS):
            before = torch.randint(3, 150000, (5,), generator=g)
            after = torch.randint(3, 150000, (short + (long - short) * i // (PROMPTS - 1),), generator=g)
            ids = torch.cat([before, torch.tensor([VISION_START] + [IMAGE] * n_image + [VISION_END]), after])
            self.prompts.append(
                {
                    "input_ids": ids,
                    "image_grid_thw": torch.tensor([[1, grid, grid]]),
                    "pixel_values": torch.randn(grid * grid, 3 * 2 * 14 * 14, generator=g),
                }
            )
        self.tokenizer = Tokenizer()
        lengths = [p["input_ids"].numel() for p in self.prompts]
        self.flops = qwen2_vl_matmul_flops(
            text,
            vision,
            seq_lens=[n + NEW_TOKENS for n in lengths],
            image_patches=[grid * grid] * PROMPTS,
            supervised_rows=PROMPTS * NEW_TOKENS,
        )
        self.shape = f"{PROMPTS} prompts of {min(lengths)}-{max(lengths)} tokens, {side}px images, {NEW_TOKENS} new"

    def batched(self):
        from clinkd.eval.predict import generate_texts

        texts, tokens = generate_texts(self.model, self.tokenizer, self.prompts, max_new_tokens=NEW_TOKENS)
        return [t[0] for t in texts], tokens

    def loop(self):
        """generate() on one prompt at a time: the stock transformers way (positions from the patched model)."""
        texts, tokens = [], 0
        for p in self.prompts:
            ids = p["input_ids"][None].to(self.device)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=p["pixel_values"].to(self.device, self.dtype),
                image_grid_thw=p["image_grid_thw"].to(self.device),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=EOS,
                pad_token_id=PAD,
            )
            row = out[0, ids.shape[1] :].tolist()
            n = row.index(EOS) + 1 if EOS in row else len(row)
            texts.append(self.tokenizer.decode([t for t in row[:n] if t not in (EOS, PAD)]))
            tokens += n
        return texts, tokens


_SETUPS: dict[str, Setup] = {}


@pytest.fixture
def setup(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if device not in _SETUPS:
        _SETUPS.clear()
        _SETUPS[device] = Setup(device)
    return _SETUPS[device]


@pytest.mark.parametrize("impl", ["clinkd", "loop"])
def test_rct_generation(benchmark, setup, device, impl):
    with torch.no_grad():
        ours, tokens = setup.batched()
        theirs, their_tokens = setup.loop()
    assert ours == theirs and tokens == their_tokens, "the batched and the looped generation answer differently"
    fn = setup.batched if impl == "clinkd" else setup.loop

    def run():
        with torch.no_grad():
            fn()
        sync(device)

    benchmark.group = (
        f"rct_generation {device}, MCG-RoPE Qwen2-VL {'2B' if device == 'cuda' else 'scaled-down'} "
        f"shapes, {setup.shape}, {str(setup.dtype).replace('torch.', '')} greedy"
    )
    record(
        benchmark,
        floor_s=compute_floor_s(setup.flops, device, setup.dtype),
        flops=setup.flops,
        op="rct_generation",
        impl=impl,
        device=device,
        tokens=tokens,
    )
    benchmark.pedantic(run, rounds=3, warmup_rounds=0, iterations=1)  # the equality check above warmed up
