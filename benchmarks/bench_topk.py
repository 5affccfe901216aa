"""Top-k pseudo-label extraction: clinkd's one-pass kernel vs what users write today in torch.

Peer "torch": softmax over the whole row, ``torch.topk`` on it, ``torch.logsumexp`` — three passes
and [N, V] temporaries. Floor: reading the logits once at the measured copy bandwidth.
"""

import pytest
import torch

from benchmarks.conftest import sync
from benchmarks.floors import memory_floor_s, record
from clinkd_kernels.topk import topk_pseudo_labels


def torch_topk_pseudo_labels(logits, k, temperature):
    y = logits.float() / temperature
    lse = torch.logsumexp(y, dim=-1)
    probs = torch.softmax(y, dim=-1)
    p, idx = probs.topk(max(k, 2), dim=-1)
    margin = p[:, 0] - p[:, 1]
    top = p[:, :k]
    return idx[:, :k].int(), top.log(), lse, margin, 1 - top.sum(-1)


IMPLS = {
    "clinkd": lambda logits, k, t: topk_pseudo_labels(logits, k, temperature=t, check=False),
    "torch": torch_topk_pseudo_labels,
}

SHAPES = {"cpu": [(2048, 151936)], "cuda": [(8192, 151936), (2048, 151936)]}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("k", [8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape_index", [0, 1])
def test_topk(benchmark, device, impl, k, dtype, shape_index):
    if shape_index >= len(SHAPES[device]):
        pytest.skip("no such shape on this device")
    if device == "cpu" and dtype != torch.float32:
        pytest.skip("CPU benchmark is fp32")
    n, v = SHAPES[device][shape_index]
    logits = torch.randn(n, v, device=device).to(dtype)
    fn = IMPLS[impl]
    benchmark.group = f"topk {device} N={n} V={v} k={k} {str(dtype).replace('torch.', '')}"
    record(
        benchmark,
        floor_s=memory_floor_s(logits.numel() * logits.element_size(), device),
        op="topk_pseudo_labels",
        shape=f"N={n},V={v},k={k}",
        impl=impl,
        device=device,
    )

    def run():
        fn(logits, k, 1.0)
        sync(device)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
