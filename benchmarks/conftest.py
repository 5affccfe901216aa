"""Shared benchmark setup: benchmarks time real kernels, never the Triton interpreter."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0")

# CLINKD_BENCH_DEVICES=cuda (as the GPU check sets it) skips the CPU cases on a GPU machine.
DEVICES = os.environ.get("CLINKD_BENCH_DEVICES", "cpu,cuda" if torch.cuda.is_available() else "cpu").split(",")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
