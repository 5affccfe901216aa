"""The frequency layout of M-RoPE: which position row (t, h, w) drives each rotary frequency.

    mrope_section (s_t, s_h, s_w), s_t + s_h + s_w = D/2, and a layout flag
    → axis int32 [D/2], values 0 (t), 1 (h), 2 (w)        (``rope_axis`` in ``reference.py`` is the math)

    contiguous  t…t h…h w…w                 Qwen2-VL (16, 24, 24), Qwen2.5-VL
    interleaved t h w t h w … t h w t…t     Qwen3-VL (24, 20, 20): h on 1, 4, … < 3·s_h, w on 2, 5, … < 3·s_w

The kernels take the axis vector as data (one int per frequency, loaded once per program next to
inv_freq), so every layout runs the same compiled code. It is built once per (sections, layout,
device) and reused by every call and every layer.
"""

from __future__ import annotations

import functools

import torch

from .reference import rope_axis


def check_mrope_layout(mrope_section, mrope_interleaved, half: int) -> tuple[int, int, int]:
    """Validate (s_t, s_h, s_w) for head dim 2·half and the layout flag; returns the sections as ints."""
    if isinstance(mrope_section, torch.Tensor):
        mrope_section = mrope_section.tolist()
    if isinstance(mrope_section, (str, bytes)):
        raise TypeError(f"mrope_section must be a sequence of 3 ints, got {mrope_section!r}")
    try:
        section = [int(s) for s in mrope_section]
    except (TypeError, ValueError):
        raise TypeError(f"mrope_section must be a sequence of 3 ints, got {mrope_section!r}") from None
    if len(section) != 3 or any(s < 0 for s in section) or any(int(s) != s for s in mrope_section):
        raise ValueError(f"mrope_section must be 3 non-negative ints, got {list(mrope_section)}")
    if sum(section) != half:
        raise ValueError(f"mrope_section must sum to D/2 = {half}, got {section} (sum {sum(section)})")
    if not isinstance(mrope_interleaved, bool):
        raise TypeError(f"mrope_interleaved must be a bool, got {type(mrope_interleaved).__name__}")
    # Interleaved: slots 1, 4, … below 3·s_h and 2, 5, … below 3·s_w must all exist among the D/2.
    if mrope_interleaved and (3 * section[1] - 1 > half or 3 * section[2] > half):
        raise ValueError(f"mrope_interleaved=True puts h on frequencies 1, 4, 7, … < 3·s_h and w on 2, 5, 8, … < "
                         f"3·s_w of the D/2 = {half}: mrope_section {section} does not fit (s_h, s_w ≤ D/6)")
    return tuple(section)


@functools.lru_cache(maxsize=64)
def _axis_on(section: tuple[int, int, int], interleaved: bool, device: torch.device) -> torch.Tensor:
    return rope_axis(section, interleaved).to(device=device, dtype=torch.int32)


def axis_tensor(section: tuple[int, int, int], interleaved: bool, device: torch.device) -> torch.Tensor:
    """int32 [D/2] on ``device``: the position row (0 t, 1 h, 2 w) of each frequency (``rope_axis``),
    made once per (sections, layout, device) so a forward's many layers do not copy it each call."""
    return _axis_on(tuple(section), bool(interleaved), torch.device(device))
