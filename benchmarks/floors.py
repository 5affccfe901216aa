"""Physical floors for the benchmarks: the time an op could take if it only moved its bytes at the
machine's bandwidth (or only did its FLOPs at the machine's matmul rate).

Rates are measured on the machine running the benchmark, so a floor is always of the same machine
as the time it is compared with.
"""

from __future__ import annotations

import functools
import time

import torch


def _best_time(fn, repeat: int = 10) -> float:
    """The fastest of ``repeat`` calls after one warm-up call: a floor takes the machine at its best."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


# The best rate measured so far in this process, by (what, device, dtype). Every floor re-measures (3 calls
# after the first 10) and keeps the best: a floor takes the machine at its best, and a shared machine
# has slow spells — a rate measured once, in one of them, made floors of 1.5x the real one.
_BEST: dict = {}


def _best_rate(key, work: float, fn) -> float:
    rate = work / _best_time(fn, repeat=3 if key in _BEST else 10)
    _BEST[key] = max(_BEST.get(key, 0.0), rate)
    return _BEST[key]


@functools.cache
def _copy_operands(device: str):
    n = 64 * 1024 * 1024
    src = torch.rand(n, device=device)
    return src, torch.empty_like(src)


@functools.cache
def _matmul_operands(device: str, dtype: torch.dtype):
    n = 4096 if device != "cpu" else 2048
    return torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)


def bandwidth_bytes_per_s(device: str = "cpu") -> float:
    """Copy bandwidth (read + write bytes per second) of ``device``, from a 256 MiB copy: the best so far."""
    src, dst = _copy_operands(device)
    return _best_rate(("copy", device), 2 * src.numel() * src.element_size(), lambda: dst.copy_(src))


def matmul_flops_per_s(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Dense matmul rate of ``device`` for ``dtype``, from square matmuls: the best so far."""
    a, b = _matmul_operands(device, dtype)
    return _best_rate(("matmul", device, dtype), 2 * a.shape[0] ** 3, lambda: a @ b)


def memory_floor_s(nbytes: float, device: str = "cpu") -> float:
    return nbytes / bandwidth_bytes_per_s(device)


def compute_floor_s(flops: float, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    return flops / matmul_flops_per_s(device, dtype)


def record(benchmark, *, floor_s: float, **info) -> None:
    """Attach the floor and ``ours/floor`` (filled in after the run by the renderer) to a benchmark."""
    benchmark.extra_info["floor_s"] = floor_s
    benchmark.extra_info.update(info)


def qwen2_vl_matmul_flops(
    text: dict,
    vision: dict,
    *,
    seq_lens: list[int],
    image_patches: list[int],
    supervised_rows: int,
    lm_head_rows: int | None = None,
) -> float:
    """Matmul FLOPs of one Qwen2-VL forward (the work a floor counts; norms, rotations and softmaxes
    are ignored).

    text / vision: the configs' fields (hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, num_key_value_heads; depth, embed_dim, num_heads, mlp_ratio,
    spatial_merge_size, hidden_size). seq_lens: tokens per sequence (causal attention over each);
    image_patches: patches per image (full attention within each image); lm_head_rows: rows that need
    logits (default: supervised_rows, the minimum a next-token loss needs).

        text layer, per token:   2·H·(Hq + 2·Hkv) + 2·Hq·H + 3·2·H·I      (qkv, out, gate/up/down)
        causal attention:        2·S²·Hq per layer and sequence           (QKᵀ and PV, half the square)
        vision block, per patch: 2·E·3E + 2·E·E + 2·2·E·rE, attention 4·P·E per patch
        merger, per merged token: 2·(m²E)² + 2·m²E·H;   lm_head: 2·H·V per row
    """
    h, i = text["hidden_size"], text["intermediate_size"]
    head = h // text["num_attention_heads"]
    hq, hkv = h, text["num_key_value_heads"] * head
    tokens = sum(seq_lens)
    per_token = 2 * h * (hq + 2 * hkv) + 2 * hq * h + 3 * 2 * h * i
    flops = text["num_hidden_layers"] * (tokens * per_token + sum(2 * s * s * hq for s in seq_lens))
    rows = supervised_rows if lm_head_rows is None else lm_head_rows
    flops += 2 * h * text["vocab_size"] * rows
    e, r, m = vision["embed_dim"], vision.get("mlp_ratio", 4), vision["spatial_merge_size"]
    patches = sum(image_patches)
    block = patches * (2 * e * 3 * e + 2 * e * e + 2 * 2 * e * r * e) + sum(4 * p * p * e for p in image_patches)
    merged = patches // (m * m)
    flops += vision["depth"] * block + merged * (2 * (m * m * e) ** 2 + 2 * m * m * e * vision["hidden_size"])
    return float(flops)
