"""Peak memory of one training step (forward + backward) of a Qwen2-VL model, stock vs patched.

    python -m tests.patch.peak_memory                       # hidden 512, vocab 151936, 2048 tokens, CPU fp32
    python -m tests.patch.peak_memory --device cuda         # bf16 on a GPU (Triton kernels)

Each variant runs in its own fresh process, so neither inherits the other's allocator state. The
child builds the model and the batch, then measures only the step:

``benchmarks.memory.peak_bytes``: on CPU the resident-set peak above what was resident before the
step (VmHWM reset through ``/proc/self/clear_refs``), on CUDA max_memory_allocated above what was
allocated before it.

Model: text decoder hidden 512, 4 layers, 8 query / 2 KV heads (head_dim 64), MLP 1536, vocab
151936 (Qwen2-VL's); a depth-1 vision tower; one image of 64 placeholder tokens inside 2048 tokens,
labels on every text token. The stock step materialises [2048 × 151936] fp32 logits (1.16 GiB) and
their gradient; the patched one chunks them inside ``linear_kd_loss``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _child(args) -> dict:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from benchmarks.memory import peak_bytes
    from clinkd.patch import patch_qwen2_vl

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    text = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=2,
        max_position_embeddings=4 * args.tokens,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[8, 12, 12]),
    )
    vision = dict(
        depth=1,
        embed_dim=32,
        hidden_size=args.hidden,
        num_heads=2,
        patch_size=2,
        spatial_merge_size=2,
        temporal_patch_size=1,
        in_channels=3,
        mlp_ratio=2,
    )
    special = dict(
        image_token_id=args.vocab - 4,
        video_token_id=args.vocab - 3,
        vision_start_token_id=args.vocab - 2,
        vision_end_token_id=args.vocab - 1,
    )
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **special))
    model = model.to(device=device, dtype=dtype).train()
    if args.variant == "patched":
        patch_qwen2_vl(model)

    n_img = 64  # grid (1, 16, 16) → 64 tokens after the 2×2 merge
    ids = torch.randint(3, args.vocab - 8, (1, args.tokens))
    ids[0, 10] = special["vision_start_token_id"]
    ids[0, 11 : 11 + n_img] = special["image_token_id"]
    ids[0, 11 + n_img] = special["vision_end_token_id"]
    image = ids == special["image_token_id"]
    batch = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=image.long(),
        image_grid_thw=torch.tensor([[1, 16, 16]]),
        pixel_values=torch.randn(256, 12, dtype=dtype),
        labels=ids.masked_fill(image, -100),
    )
    batch = {k: v.to(device) for k, v in batch.items()}

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        return loss

    if device.type == "cuda":
        step()  # compile the Triton kernels outside the measured step
        model.zero_grad(set_to_none=True)
    result = {}

    def timed():
        t0 = time.perf_counter()
        result["loss"] = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        result["seconds"] = time.perf_counter() - t0

    peak = peak_bytes(timed, device.type)
    loss, seconds = result["loss"], result["seconds"]
    return dict(
        variant=args.variant,
        device=args.device,
        dtype=str(dtype),
        tokens=args.tokens,
        hidden=args.hidden,
        vocab=args.vocab,
        layers=args.layers,
        loss=float(loss),
        step_seconds=round(seconds, 2),
        peak_step_mib=round(peak / 2**20, 1),
    )


def measure(variant: str, **options) -> dict:
    """Run one variant ("stock" or "patched") in a fresh process; returns its figures."""
    cmd = [sys.executable, "-m", "tests.patch.peak_memory", "--child", variant]
    for key, value in options.items():
        cmd += [f"--{key}", str(value)]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", choices=["stock", "patched"], dest="variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(_child(args)))
        return
    options = dict(device=args.device, tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, layers=args.layers)
    results = [measure(v, **options) for v in ("stock", "patched")]
    for r in results:
        print(json.dumps(r))
    stock, patched = (r["peak_step_mib"] for r in results)
    print(
        f"peak memory of one training step: stock {stock:.0f} MiB, patched {patched:.0f} MiB "
        f"({stock / max(patched, 1e-9):.2f}x less)"
    )


if __name__ == "__main__":
    main()
