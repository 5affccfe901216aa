"""The frequency layout of M-RoPE: which position row (t, h, w) drives each rotary frequency.

    mrope_section (s_t, s_h, s_w), s_t + s_h + s_w = D/2, and a layout flag
    → axis int32 [D/2], values 0 (t), 1 (h), 2 (w)        (``rope_axis`` in ``reference.py`` is the math)

    contiguous  t…t h…h w…w                 Qwen2-VL (16, 24, 24), Qwen2.5-VL
    interleaved t h w t h w … t h w t…t     Qwen3-VL (24, 20, 20): h on 1, 4, … < 3·s_h, w on 2, 5, … < 3·s_w

The kernels take the axis vector as data (one int per frequency, loaded once per program next to
inv_freq), so every layout runs the same compiled code. It is built once per (sections, layout,
device) and reused by every call and every layer.

``check_mrope_section`` is the one rule for the sections and the layout flag: every kernel-side
validator calls it.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence

import numpy as np
import torch

from .._validation import check_int
from .reference import rope_axis


def check_mrope_section(mrope_section, half: int, interleaved) -> tuple[int, int, int]:
    """Validate the M-RoPE sections of a head dim D = 2·half; returns them as ints (s_t, s_h, s_w).

    The rule every kernel-side validator applies (``apply_mrope``, ``mcg_rope_attention``):

    * ``mrope_section`` is three integers (s_t, s_h, s_w): a list or tuple whose items are ints, numpy
      integers or integer 0-d tensors, or a 1-D integer tensor / numpy array of three. Each is >= 0 and
      s_t + s_h + s_w = half (D/2): every frequency is driven by exactly one position row.
    * ``interleaved`` is a bool. When True (Qwen3-VL's layout) h drives frequencies 1, 4, 7, … below
      3·s_h and w drives 2, 5, 8, … below 3·s_w, so those slots must exist among the D/2:
      3·s_h − 1 <= half and 3·s_w <= half (s_h, s_w at most about D/6).

    Raises ValueError (not three items, a negative one, a wrong sum, sections the interleaved layout
    cannot hold) or TypeError (an item that is not an integer, ``interleaved`` not a bool); every message
    names ``mrope_section`` or ``mrope_interleaved``.
    """
    if isinstance(mrope_section, (torch.Tensor, np.ndarray)):
        mrope_section = mrope_section.tolist()
    if isinstance(mrope_section, (str, bytes)) or not isinstance(mrope_section, Sequence) or len(mrope_section) != 3:
        raise ValueError(f"mrope_section must be 3 ints (t, h, w), got {mrope_section!r}")
    section = [check_int(f"mrope_section[{i}]", _as_int(s), low=0) for i, s in enumerate(mrope_section)]
    if sum(section) != half:
        raise ValueError(f"mrope_section must sum to D/2 = {half}, got {section} (sum {sum(section)})")
    if not isinstance(interleaved, bool):
        raise TypeError(f"mrope_interleaved must be a bool, got {type(interleaved).__name__}")
    if interleaved and (3 * section[1] - 1 > half or 3 * section[2] > half):
        raise ValueError(
            f"mrope_interleaved=True puts h on frequencies 1, 4, 7, … < 3·s_h and w on 2, 5, 8, … < "
            f"3·s_w of the D/2 = {half}: mrope_section {section} does not fit (s_h, s_w ≤ D/6)"
        )
    return tuple(section)


def _as_int(item):
    """A numpy integer or an integer 0-d tensor as a Python int; anything else unchanged (for check_int)."""
    if isinstance(item, torch.Tensor):
        integer = item.dim() == 0 and not (
            item.dtype.is_floating_point or item.dtype.is_complex or item.dtype == torch.bool
        )
        return int(item) if integer else item
    if isinstance(item, numbers.Integral) and not isinstance(item, bool):
        return int(item)
    return item


def check_mrope_layout(mrope_section, mrope_interleaved, half: int) -> tuple[int, int, int]:
    """``check_mrope_section`` with the layout flag second (the order the model layer calls it in)."""
    return check_mrope_section(mrope_section, half, mrope_interleaved)


@functools.lru_cache(maxsize=64)
def _axis_on(section: tuple[int, int, int], interleaved: bool, device: torch.device) -> torch.Tensor:
    return rope_axis(section, interleaved).to(device=device, dtype=torch.int32)


def axis_tensor(section: tuple[int, int, int], interleaved: bool, device: torch.device) -> torch.Tensor:
    """int32 [D/2] on ``device``: the position row (0 t, 1 h, 2 w) of each frequency (``rope_axis``),
    made once per (sections, layout, device) so a forward's many layers do not copy it each call."""
    return _axis_on(tuple(section), bool(interleaved), torch.device(device))
