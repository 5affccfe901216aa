"""Shared benchmark setup: benchmarks time real kernels, never the Triton interpreter."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
