"""Input checks shared by every public op.

Each check raises ``ValueError`` (wrong value/shape) or ``TypeError`` (wrong type/dtype) whose message
names the argument, what was expected and what was given, so a user never has to read a kernel to
learn what went wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str, x, *, ndim: int | Sequence[int] | None = None, dtypes: Sequence[torch.dtype] | None = None
) -> torch.Tensor:
    """Check that ``x`` is a tensor with data (not on the meta device), one of ``ndim`` dimensions and one
    of ``dtypes``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_not_meta(name, x)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got {x.dim()}-D with shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({want}), got {str(x.dtype).replace('torch.', '')}")
    return x


def check_not_meta(name: str, x: torch.Tensor) -> None:
    """A meta-device tensor has a shape but no values: every op refuses it by name before any work."""
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no data; pass a tensor with values (cpu or cuda)")


def check_shape(name: str, x: torch.Tensor, shape: Sequence[int | None]) -> None:
    """Check ``x.shape`` against ``shape``; ``None`` entries match any size."""
    ok = x.dim() == len(shape) and all(want is None or want == got for want, got in zip(shape, x.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(x.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given (non-None) tensors are on one device, and not the meta device."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    if not named:
        return
    for n, t in named:
        check_not_meta(n, t)
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}; move them to one device")


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """An integer (not bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_positive_float(name: str, value) -> float:
    """A finite float > 0 (temperatures, scales)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


# Temperatures divide fp32 logits in every kernel: outside this range z/T overflows or underflows fp32
# for ordinary logits (|z| up to ~1e3), and the distribution the kernels compute is not softmax(z/T).
TEMPERATURE_RANGE = (1e-6, 1e6)


def check_temperature(name: str, value) -> float:
    """A temperature: a finite float in TEMPERATURE_RANGE (see there why the range)."""
    value = check_positive_float(name, value)
    low, high = TEMPERATURE_RANGE
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}] (the fp32 kernels divide logits by it), got {value!r}")
    return value


def check_nonnegative_float(name: str, value) -> float:
    """A finite float >= 0 (loss weights)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def first_rows(mask: torch.Tensor, limit: int = 5) -> str:
    """Human-readable list of the first ``limit`` row indices where ``mask`` is true."""
    rows = mask.nonzero().flatten()[:limit].tolist()
    more = int(mask.sum()) - len(rows)
    text = ", ".join(str(r) for r in rows)
    return text + (f" (and {more} more)" if more > 0 else "")
