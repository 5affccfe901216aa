"""Backend selection: defaults per device, forced backends that cannot run fail loudly."""

import pytest
import torch

from clinkd_kernels._dispatch import resolve_backend

CPU = torch.device("cpu")


def test_default_on_cpu_prefers_the_compiled_kernel_not_the_interpreter(monkeypatch):
    monkeypatch.delenv("CLINKD_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("op", None, CPU, ("triton", "cpu", "torch")) == "cpu"
    assert resolve_backend("op", None, CPU, ("triton", "torch")) == "torch"


def test_forced_backend_is_used_or_refused(monkeypatch):
    monkeypatch.delenv("CLINKD_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("op", "triton", CPU, ("triton", "cpu", "torch")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="op: backend='triton' cannot run: Triton kernels need CUDA"):
        resolve_backend("op", "triton", CPU, ("triton", "cpu", "torch"))
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve_backend("op", "cuda", CPU, ("cuda", "cpu", "torch"))
    with pytest.raises(ValueError, match="has no 'cuda' backend"):
        resolve_backend("op", "cuda", CPU, ("triton", "torch"))
    with pytest.raises(ValueError, match="not a backend"):
        resolve_backend("op", "gpu", CPU, ("triton", "torch"))


def test_environment_variable_forces_too(monkeypatch):
    monkeypatch.setenv("CLINKD_BACKEND", "torch")
    assert resolve_backend("op", None, CPU, ("triton", "cpu", "torch")) == "torch"
    monkeypatch.setenv("CLINKD_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="CLINKD_BACKEND='cuda' cannot run"):
        resolve_backend("op", None, CPU, ("cuda", "cpu", "torch"))
    # The argument wins over the environment.
    assert resolve_backend("op", "cpu", CPU, ("cuda", "cpu", "torch")) == "cpu"

