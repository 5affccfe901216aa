"""Backend selection: defaults per device, forced backends that cannot run fail loudly, and every public op
serves exactly the backends of its row of ``OP_BACKENDS``."""

import re

import pytest
import torch

from clinkd_kernels import PseudoLabels, apply_mrope, kd_loss, linear_kd_loss, mcg_rope_attention, topk_pseudo_labels
from clinkd_kernels._dispatch import BACKENDS, MODEL_BACKENDS, OP_BACKENDS, OpBackends, resolve_backend

CPU = torch.device("cpu")


@pytest.fixture
def op_row(monkeypatch):
    """Give the op named "op" the row ``serves`` for one test."""

    def give(*serves: str) -> str:
        monkeypatch.setitem(OP_BACKENDS, "op", OpBackends(tuple(serves)))
        return "op"

    return give


def test_default_on_cpu_prefers_the_compiled_kernel_not_the_interpreter(monkeypatch, op_row):
    monkeypatch.delenv("CLINKD_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(op_row("triton", "cpu", "torch"), None, CPU) == "cpu"
    assert resolve_backend(op_row("triton", "torch"), None, CPU) == "torch"


def test_forced_backend_is_used_or_refused(monkeypatch, op_row):
    monkeypatch.delenv("CLINKD_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(op_row("triton", "cpu", "torch"), "triton", CPU) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="op: backend='triton' cannot run: Triton kernels need CUDA"):
        resolve_backend(op_row("triton", "cpu", "torch"), "triton", CPU)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve_backend(op_row("cuda", "cpu", "torch"), "cuda", CPU)
    with pytest.raises(ValueError, match="has no 'cuda' backend"):
        resolve_backend(op_row("triton", "torch"), "cuda", CPU)
    with pytest.raises(ValueError, match="not a backend"):
        resolve_backend(op_row("triton", "torch"), "gpu", CPU)


def test_environment_variable_forces_too(monkeypatch, op_row):
    monkeypatch.setenv("CLINKD_BACKEND", "torch")
    assert resolve_backend(op_row("triton", "cpu", "torch"), None, CPU) == "torch"
    monkeypatch.setenv("CLINKD_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="CLINKD_BACKEND='cuda' cannot run"):
        resolve_backend(op_row("cuda", "cpu", "torch"), None, CPU)
    # The argument wins over the environment.
    assert resolve_backend(op_row("cuda", "cpu", "torch"), "cpu", CPU) == "cpu"


def test_the_table_names_known_backends_and_what_a_model_can_run_on():
    for op, row in OP_BACKENDS.items():
        assert row.serves and set(row.serves) <= set(BACKENDS), op
        assert "torch" in row.serves, f"{op}: every op serves its reference"
    assert MODEL_BACKENDS == (None, "triton", "cpu", "torch")
    with pytest.raises(KeyError, match="no row in OP_BACKENDS"):
        resolve_backend("no_such_op", None, CPU)


def _calls():
    """One good call of every public op that takes backend=, by op name."""
    logits = torch.randn(4, 11)
    labels = torch.randint(0, 11, (4,))
    q, k, v = torch.randn(1, 3, 2, 64), torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64)
    pos = torch.randint(0, 9, (3, 1, 3))
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    hidden, weight = torch.randn(4, 5), torch.randn(11, 5)
    teacher = PseudoLabels(
        torch.tensor([[0, 1]] * 4),
        torch.full((4, 2), -1.0),
        torch.zeros(4),
        torch.zeros(4),
        torch.full((4,), 1 - 2 * 0.36787944117144233),
    )
    return {
        "topk_pseudo_labels": lambda b: topk_pseudo_labels(logits, 3, backend=b),
        "apply_mrope": lambda b: apply_mrope(q, k, pos, inv, (8, 12, 12), backend=b),
        "mcg_rope_attention": lambda b: mcg_rope_attention(q, k, v, pos, inv, (8, 12, 12), backend=b),
        "kd_loss": lambda b: kd_loss(logits, labels, teacher=teacher, backend=b),
        "linear_kd_loss": lambda b: linear_kd_loss(hidden, weight, labels, teacher=teacher, backend=b),
    }


def test_every_public_op_has_a_row():
    assert set(_calls()) == set(OP_BACKENDS)


@pytest.mark.parametrize("op", sorted(OP_BACKENDS))
def test_each_op_refuses_a_backend_outside_its_row_and_names_its_own(monkeypatch, op):
    monkeypatch.delenv("CLINKD_BACKEND", raising=False)
    call = _calls()[op]
    serves = OP_BACKENDS[op].serves
    outside = [b for b in BACKENDS if b not in serves]
    assert outside, f"{op} serves every backend: nothing to refuse"
    for backend in outside:
        with pytest.raises(ValueError, match=rf"{op} has no '{backend}' backend") as err:
            call(backend)
        assert re.search(re.escape(f"it supports {serves}"), str(err.value)), str(err.value)
    call("torch")  # the row's reference runs: the refusals above come from the row alone
