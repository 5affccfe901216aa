"""The vision tower: clinkd's fused attention (2-D rotary inside packed, non-causal attention) vs the stock
transformers tower, forward and forward+backward, at medically realistic image sizes.

Tower: Qwen2-VL-7B's (32 blocks, width 1280, 16 heads of D=80, MLP 5120, patch 14, 2x2 merge into 3584),
bf16 on a GPU. Inputs (the Qwen2-VL processor's resize to multiples of 28):
* ``4x1024px``: 4 images of 1008² → 72x72 = 5184 patches each (20 736 tokens);
* ``16x448px``: 16 images of 448² → 32x32 = 1024 patches each (16 384 tokens).
On CPU the tower has 1 block and the images are smaller (``4x224px``: 4 of 224², 256 patches each),
fp32: a CPU figure, labelled as such.

Peers, on the same pixels: ``stock`` (the transformers tower with its default SDPA attention: rotation
by cos/sin tables, then attention image by image) and, when flash-attn is installed, ``stock-fa2``
(``attn_implementation="flash_attention_2"``: one varlen call per layer). Before a peer is timed its
output is checked against clinkd's. Floor: the tower's FLOPs (every linear layer, attention within each
image: 4·n²·C per image and block; backward 2x forward) at the measured matmul rate. ``extra_info`` also
records ``vit_share``: the tower's share of the FLOPs of one ClinKD training step of a Qwen2-VL-7B
student on these images plus 512 text tokens (student forward+backward, 2·params·tokens·3, teacher
stored) — by calculation, not measured.
"""

from __future__ import annotations

import copy
import functools
import importlib.util

import pytest
import torch

from benchmarks.conftest import DEVICES, sync
from benchmarks.floors import compute_floor_s, record

PATCH, MERGE, TEMPORAL = 14, 2, 2
TOWER_7B = dict(
    depth=32,
    embed_dim=1280,
    hidden_size=3584,
    num_heads=16,
    mlp_ratio=4,
    patch_size=PATCH,
    spatial_merge_size=MERGE,
    temporal_patch_size=TEMPORAL,
    in_channels=3,
)
CASES = {"cuda": {"4x1024px": (4, 72), "16x448px": (16, 32)}, "cpu": {"4x224px": (4, 16)}}
STUDENT_PARAMS = 7.6e9  # Qwen2-VL-7B's language model
TEXT_TOKENS = 512


def _tower_flops(n_images: int, side: int, cfg: dict) -> float:
    """Forward FLOPs of the tower on ``n_images`` images of side x side patches."""
    c, depth, n = cfg["embed_dim"], cfg["depth"], side * side
    tokens = n_images * n
    patch_in = 3 * TEMPORAL * PATCH * PATCH
    linear = 2 * tokens * (patch_in * c + depth * (4 * c * c + 2 * c * cfg["mlp_ratio"] * c))
    attention = depth * n_images * 4 * n * n * c
    merged = tokens // (MERGE * MERGE)
    merger = 2 * merged * (4 * c * 4 * c + 4 * c * cfg["hidden_size"])
    return float(linear + attention + merger)


def _vit_share(n_images: int, side: int) -> float:
    vit = 3 * _tower_flops(n_images, side, TOWER_7B)
    llm = 3 * 2 * STUDENT_PARAMS * (n_images * side * side // (MERGE * MERGE) + TEXT_TOKENS)
    return vit / (vit + llm)


@functools.cache
def _towers(device: str, dtype: torch.dtype, attn: str):
    """(stock tower, patched tower) of one model, the same weights."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from clinkd.patch import patch_qwen2_vl

    vision = dict(TOWER_7B, depth=TOWER_7B["depth"] if device == "cuda" else 1)
    text = dict(
        vocab_size=512,
        hidden_size=vision["hidden_size"],
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=28,
        num_key_value_heads=4,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24]),
    )
    config = Qwen2VLConfig(text_config=text, vision_config=vision)
    config._attn_implementation = attn
    config.vision_config._attn_implementation = attn
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).to(device=device, dtype=dtype)
    patched = patch_qwen2_vl(
        copy.deepcopy(model),
        attention=False,
        loss=False,
        vision_attention=True,
        backend="triton" if device == "cuda" else "cpu",
    )
    return model.model.visual, patched.model.visual


def _inputs(device: str, dtype: torch.dtype, n_images: int, side: int):
    g = torch.Generator().manual_seed(1)
    grids = torch.tensor([[1, side, side]] * n_images, device=device)
    pixels = torch.randn(n_images * side * side, 3 * TEMPORAL * PATCH * PATCH, generator=g).to(device, dtype)
    return pixels, grids


def _impl_tower(impl: str, device: str, dtype: torch.dtype):
    if impl == "stock-fa2":
        if importlib.util.find_spec("flash_attn") is None:
            pytest.skip("flash-attn is not installed")
        if device != "cuda":
            pytest.skip("flash-attn is a GPU peer")
        return _towers(device, dtype, "flash_attention_2")[0]
    stock, patched = _towers(device, dtype, "sdpa")
    return patched if impl == "clinkd" else stock


def _run(benchmark, impl, device, case, mode):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n_images, side = CASES[device][case]
    tower = _impl_tower(impl, device, dtype)
    pixels, grids = _inputs(device, dtype, n_images, side)
    if impl != "clinkd":  # the peer must compute clinkd's tower on the same pixels
        with torch.no_grad():
            got = tower(pixels, grid_thw=grids).pooler_output.float()
            want = _impl_tower("clinkd", device, dtype)(pixels, grid_thw=grids).pooler_output.float()
        err = ((got - want).norm() / want.norm()).item()
        assert err < (1e-4 if dtype == torch.float32 else 3e-2), f"{impl} differs from clinkd: relative {err:.2e}"
    cfg = dict(TOWER_7B, depth=TOWER_7B["depth"] if device == "cuda" else 1)
    flops = _tower_flops(n_images, side, cfg) * (3 if mode == "fwd+bwd" else 1)
    if mode == "fwd+bwd":
        params = [p for p in tower.parameters()]

        def step():
            out = tower(pixels, grid_thw=grids).pooler_output
            torch.autograd.grad(out.float().square().mean(), params)
            sync(device)
    else:

        def step():
            with torch.no_grad():
                tower(pixels, grid_thw=grids)
            sync(device)

    blocks = cfg["depth"]
    benchmark.group = (
        f"vision tower {mode} {device} {str(dtype)[6:]} Qwen2-VL-7B tower ({blocks} blocks) "
        f"{case} ({n_images}x{side * side} patches)"
    )
    rounds = 3 if device == "cpu" else 5
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1)
    record(
        benchmark,
        floor_s=compute_floor_s(flops, device, dtype),
        impl=impl,
        op="vision_tower",
        device=device,
        shape=f"{n_images}x{side}x{side} patches, D=80",
        mode=mode,
        flops=flops,
        tflops=flops / benchmark.stats.stats.median / 1e12,
        vit_share=_vit_share(n_images, side),
    )


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["clinkd", "stock"])
def test_vision_tower_cpu(benchmark, impl, mode):
    if "cpu" not in DEVICES:
        pytest.skip("CPU cases deselected by CLINKD_BENCH_DEVICES")
    _run(benchmark, impl, "cpu", "4x224px", mode)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", list(CASES["cuda"]))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["clinkd", "stock", "stock-fa2"])
def test_vision_tower_gpu(benchmark, impl, mode, case):
    if "cuda" not in DEVICES:
        pytest.skip("GPU cases deselected by CLINKD_BENCH_DEVICES")
    _run(benchmark, impl, "cuda", case, mode)
