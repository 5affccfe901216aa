"""Which implementation runs an op.

Backends:

* ``"triton"``   – Triton kernels. CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set
  before the kernel modules were imported (how the test suite runs them without a GPU).
* ``"cuda"``     – CUDA C++ kernels of the ``clinkd_kernels._C`` extension (CUDA tensors).
* ``"cpu"``      – C++ CPU kernels of the extension, or a memory-efficient PyTorch path (CPU tensors).
* ``"portable"`` – the loss rows in chunked PyTorch (any device): what runs where neither the Triton
  kernel nor the extension can.
* ``"torch"``    – the plain PyTorch reference (any device): the spec, written for clarity.

``OP_BACKENDS`` is the one declaration of which op serves which of them; every public op and
``resolve_backend`` read it. A backend is chosen per call: the ``backend=`` argument, else the
``CLINKD_BACKEND`` environment variable, else the op's default for the tensor's device (the first
backend of its row that can run there, the interpreter and the reference excepted). A backend the
user asked for that the op does not serve, or that cannot run, raises an error; nothing silently
falls back.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

BACKENDS = ("triton", "cuda", "cpu", "portable", "torch")


class OpBackends(NamedTuple):
    """One op's row of ``OP_BACKENDS``.

    ``serves``: the backends the op implements, in order of preference for a device's default.
    ``cpu_needs_extension``: its ``"cpu"`` backend is a C++ kernel, so it runs only where the
    extension is built (by default the next backend of the row is taken instead).
    """

    serves: tuple[str, ...]
    cpu_needs_extension: bool = False


# mcg_rope_index has no row: it takes no backend and picks its path by device (NumPy on the host,
# tensor ops on the device).
OP_BACKENDS: dict[str, OpBackends] = {
    "topk_pseudo_labels": OpBackends(("cuda", "cpu", "torch"), cpu_needs_extension=True),
    "apply_mrope": OpBackends(("triton", "cpu", "torch")),
    "mcg_rope_attention": OpBackends(("triton", "cpu", "torch")),
    "kd_loss": OpBackends(("triton", "cpu", "portable", "torch"), cpu_needs_extension=True),
    "linear_kd_loss": OpBackends(("triton", "cpu", "portable", "torch"), cpu_needs_extension=True),
}


def served_by_all(*ops: str) -> tuple[str, ...]:
    """The backends every one of ``ops`` serves, in ``BACKENDS`` order."""
    return tuple(b for b in BACKENDS if all(b in OP_BACKENDS[op].serves for op in ops))


# What one backend= for a whole model forward can name: the backends of every op a patched model
# passes its backend to (the rotation, the fused attention, the fused loss); None picks by device.
MODEL_BACKENDS = (None, *served_by_all("apply_mrope", "mcg_rope_attention", "linear_kd_loss"))


def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a declared dependency
        return False
    return True


# A module constant, not a cached function: torch.compile reads it as a constant while tracing an op
# (a functools cache inside a traced region makes dynamo warn and trace through the wrapper).
TRITON_AVAILABLE = _import_triton()


def triton_available() -> bool:
    return TRITON_AVAILABLE


@functools.cache
def extension():
    """The compiled ``clinkd_kernels._C`` module, or None when it was not built."""
    try:
        import clinkd_kernels._C as compiled  # the extension module itself (the package is already imported)
    except ImportError:
        return None
    return compiled


def extension_has_cuda() -> bool:
    ext = extension()
    return ext is not None and bool(ext.has_cuda())


def _why_unavailable(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device``; else the reason it cannot."""
    if backend in ("torch", "portable"):  # PyTorch ops: any device
        return None
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type} tensors"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA kernel needs CUDA tensors, got {device.type} tensors"
        if extension() is None:
            return "the clinkd_kernels._C extension is not built (reinstall with a CUDA toolkit present)"
        if not extension_has_cuda():
            return "the clinkd_kernels._C extension was built without CUDA (reinstall with CLINKD_FORCE_CUDA=1)"
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the CPU kernel needs CPU tensors, got {device.type} tensors"
        return None
    return f"unknown backend {backend!r}"


def resolve_backend(op: str, requested: str | None, device: torch.device) -> str:
    """Pick the backend for one call of ``op`` (a key of ``OP_BACKENDS``) on ``device``."""
    try:
        row = OP_BACKENDS[op]
    except KeyError:
        raise KeyError(f"{op!r} has no row in OP_BACKENDS (ops: {sorted(OP_BACKENDS)})") from None
    source = "backend="
    if requested is None:
        env = os.environ.get("CLINKD_BACKEND") or None
        if env is not None:
            requested, source = env, "CLINKD_BACKEND="
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{source}{requested!r} is not a backend; choose one of {BACKENDS}")
        if requested not in row.serves:
            raise ValueError(f"{op} has no {requested!r} backend; it supports {row.serves}")
        why = _why_unavailable(requested, device)
        if why is None and requested == "cpu" and row.cpu_needs_extension and extension() is None:
            why = "the clinkd_kernels._C extension is not built"
        if why is not None:
            raise RuntimeError(f"{op}: {source}{requested!r} cannot run: {why}")
        return requested

    for candidate in row.serves:
        if candidate == "torch":
            continue
        if candidate == "triton" and device.type == "cpu":
            continue  # the interpreter is for tests: it runs only when asked for by name
        if candidate == "cpu" and row.cpu_needs_extension and extension() is None:
            continue
        if _why_unavailable(candidate, device) is None:
            return candidate
    return "torch"
