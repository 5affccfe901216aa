"""MCG-RoPE attention: the fused kernel vs rotation-then-attention peers, forward and forward+backward.

``clinkd`` rotates K tiles in registers as they are loaded; ``clinkd-k-prepass`` rotates K once into
a transient copy first (CLINKD_ATTN_K_ROTATION=prepass), the choice these runs are meant to settle.
Peers, each given the same un-rotated q, k, v and positions:
* ``rope+sdpa``: transformers-style rotation (cos/sin tables [B,S,D] in the activation dtype,
  q·cos + rotate_half(q)·sin) then ``scaled_dot_product_attention`` (flash backend on a GPU);
* ``apply_mrope+sdpa``: clinkd's standalone rotation kernel then SDPA (when it is importable);
* ``rope+flash-attn``: rotation then ``flash_attn_func`` (when flash-attn is installed);
* ``sdpa-no-rope`` (GPU): SDPA's flash backend with no rotation at all (K/V heads expanded once,
  outside the timing) — the target to reach.
Head shapes of Qwen2-VL-7B (Hq=28, Hkv=4, D=128) and 2B (Hq=12, Hkv=2, D=128) with contiguous sections
(16, 24, 24), and Qwen3-VL-8B (Hq=32, Hkv=8, D=128) with its interleaved sections (24, 20, 20), causal,
B=1. Before a peer is timed, its output is checked against clinkd's on the same inputs.
Floor: the attention matmul FLOPs (causal: half of 4·S²·D per head forward; backward 2.5× forward)
at the measured bf16 matmul rate; ``tflops`` in extra_info is the rate each implementation reaches.
GPU sequence lengths: CLINKD_BENCH_ATTN_S (comma list, default 512,2048,8192; the full sweep is
512,1024,2048,4096,8192). CPU: one small fp32 case (S=256) so the suite runs anywhere.
"""

from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import DEVICES, sync
from benchmarks.floors import compute_floor_s, record
from clinkd_kernels.attention import mcg_rope_attention
from clinkd_kernels.rope.reference import mrope_cos_sin, rotate_half

# name: (Hq, Hkv, D, mrope_section, interleaved)
MODELS = {
    "7B": (28, 4, 128, (16, 24, 24), False),
    "2B": (12, 2, 128, (16, 24, 24), False),
    "qwen3vl-8B": (32, 8, 128, (24, 20, 20), True),
}
GPU_S = [int(s) for s in os.environ.get("CLINKD_BENCH_ATTN_S", "512,2048,8192").split(",")]

try:
    from clinkd_kernels.rope import apply_mrope
except ImportError:  # the standalone rotation is a separate op
    apply_mrope = None
try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

IMPLS = ["clinkd", "clinkd-k-prepass", "rope+sdpa", "apply_mrope+sdpa", "rope+flash-attn", "sdpa-no-rope"]


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _positions(s: int, device) -> torch.Tensor:
    """[3, 1, S]: a text run, one image of (1, h, w) merged patches at a gap of 2, then text again."""
    text = min(64, s // 4)
    side = max(1, int(((s - 2 * text) // 2) ** 0.5))
    h_idx, w_idx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    base = text - 1 + 2
    img = torch.stack([torch.full((side * side,), base), base + h_idx.flatten(), base + w_idx.flatten()])
    rest = s - text - img.shape[1]
    tail_start = int(img.max()) + 2
    tail = torch.arange(tail_start, tail_start + rest).expand(3, rest)
    pos = torch.cat([torch.arange(text).expand(3, text), img, tail], 1)
    return pos[:, None, :s].contiguous().to(device)


def _rope_transformers(q, k, pos, inv_freq, section, interleaved):
    cos, sin = mrope_cos_sin(pos, inv_freq, section, dtype=q.dtype, interleaved=interleaved)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _sdpa(q, k, v, causal=True):
    """[B,S,H,D] in and out; GQA by the SDPA flag."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=q.shape[2] != k.shape[2]
    )
    return out.transpose(1, 2)


_EXPANDED: dict = {}


def _expanded(x, heads):
    """x repeated to ``heads`` heads, computed once per input tensor (keeps autograd to x)."""
    key = (id(x), x.requires_grad, heads)
    if key not in _EXPANDED:
        if len(_EXPANDED) > 8:
            _EXPANDED.clear()
        _EXPANDED[key] = x.repeat_interleave(heads // x.shape[2], dim=2).detach().requires_grad_(x.requires_grad)
    return _EXPANDED[key]


def _impl_fn(impl: str, device: str, section, interleaved: bool):
    layout = dict(mrope_interleaved=interleaved)
    if impl == "clinkd":
        backend = "triton" if device == "cuda" else "cpu"
        return lambda q, k, v, pos, f: mcg_rope_attention(
            q, k, v, pos, f, section, causal=True, backend=backend, **layout
        )
    if impl == "clinkd-k-prepass":  # forward K rotated once up front instead of per tile (launch.py)
        if device != "cuda":
            pytest.skip("a Triton-only variant")

        def run(q, k, v, pos, f):
            with _env("CLINKD_ATTN_K_ROTATION", "prepass"):
                return mcg_rope_attention(q, k, v, pos, f, section, causal=True, backend="triton", **layout)

        return run
    if impl == "rope+sdpa":
        return lambda q, k, v, pos, f: _sdpa(*_rope_transformers(q, k, pos, f, section, interleaved), v)
    if impl == "apply_mrope+sdpa":
        if apply_mrope is None:
            pytest.skip("clinkd_kernels.rope.apply_mrope is not available")
        return lambda q, k, v, pos, f: _sdpa(*apply_mrope(q, k, pos, f, section, **layout), v)
    if impl == "rope+flash-attn":
        if flash_attn_func is None or device != "cuda":
            pytest.skip("flash-attn is not installed (or no GPU)")
        return lambda q, k, v, pos, f: flash_attn_func(
            *_rope_transformers(q, k, pos, f, section, interleaved), v, causal=True
        )
    if impl == "sdpa-no-rope":
        if device != "cuda":
            pytest.skip("the no-rotation target is a GPU case")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run(q, k, v, pos, f):
            # The flash backend, forced; K/V heads expanded to Hq by a cached view-free copy outside the
            # timing (the flash kernel of SDPA may not take GQA), so this is pure attention compute.
            k, v = _expanded(k, q.shape[2]), _expanded(v, q.shape[2])
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return _sdpa(q, k, v)

        return run
    raise ValueError(impl)


@functools.cache
def _inputs(device: str, dtype: torch.dtype, hq: int, hkv: int, d: int, s: int):
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, s, hq, d, generator=g).to(device, dtype)
    k = torch.randn(1, s, hkv, d, generator=g).to(device, dtype)
    v = torch.randn(1, s, hkv, d, generator=g).to(device, dtype)
    inv_freq = (1.0 / 1e6 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)).float().to(device)
    return q, k, v, _positions(s, device), inv_freq


def _check_same_value(impl, fn, ours, q, k, v, pos, inv_freq):
    """A peer must compute clinkd's attention on these inputs (the no-rotation target excepted)."""
    if impl in ("clinkd", "sdpa-no-rope"):
        return
    with torch.no_grad():
        got, want = fn(q, k, v, pos, inv_freq).float(), ours(q, k, v, pos, inv_freq).float()
    tol = 1e-4 if q.dtype == torch.float32 else 3e-2
    err = ((got - want).norm() / want.norm()).item()
    assert err < tol, f"{impl} differs from clinkd on the same inputs: relative error {err:.2e}"


def _run(benchmark, *, impl, device, dtype, model, s, mode, rounds, warmup):
    hq, hkv, d, section, interleaved = MODELS[model]
    fn = _impl_fn(impl, device, section, interleaved)
    q, k, v, pos, inv_freq = _inputs(device, dtype, hq, hkv, d, s)
    _check_same_value(impl, fn, _impl_fn("clinkd", device, section, interleaved), q, k, v, pos, inv_freq)
    flops = 4 * s * s * d * hq / 2  # causal forward: QKᵀ and PV over the lower triangle
    if mode == "fwd+bwd":
        flops *= 3.5
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        grad = torch.randn_like(q)

        def step():
            out = fn(q, k, v, pos, inv_freq)
            torch.autograd.grad(out, (q, k, v), grad, allow_unused=True)  # unused: sdpa-no-rope's k, v
            sync(device)
    else:

        def step():
            with torch.no_grad():
                fn(q, k, v, pos, inv_freq)
            sync(device)

    layout = "interleaved" if interleaved else "contiguous"
    benchmark.group = f"mcg_rope_attention {mode} {device} {str(dtype)[6:]} {model}-heads {layout} S={s} causal"
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup)
    median = benchmark.stats.stats.median
    record(
        benchmark,
        floor_s=compute_floor_s(flops, device, dtype),
        impl=impl,
        op="mcg_rope_attention",
        device=device,
        shape=f"B=1,S={s},Hq={hq},Hkv={hkv},D={d},{layout}",
        mode=mode,
        flops=flops,
        tflops=flops / median / 1e12,
    )


@pytest.mark.parametrize("model", ["2B", "qwen3vl-8B"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["clinkd", "rope+sdpa", "apply_mrope+sdpa"])
def test_attention_cpu(benchmark, impl, mode, model):
    if "cpu" not in DEVICES:
        pytest.skip("CPU cases deselected by CLINKD_BENCH_DEVICES")
    _run(benchmark, impl=impl, device="cpu", dtype=torch.float32, model=model, s=256, mode=mode, rounds=15, warmup=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("s", GPU_S)
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_gpu(benchmark, impl, mode, model, s):
    # First calls autotune (a few configs × 3 kernels): warm-up rounds absorb them.
    _run(
        benchmark,
        impl=impl,
        device="cuda",
        dtype=torch.bfloat16,
        model=model,
        s=s,
        mode=mode,
        rounds=10 if s <= 2048 else 4,
        warmup=3,
    )
