"""Argument checks of ``topk_pseudo_labels``: the logits, k and the temperature before any work
(``check_inputs``), and the rows without a distribution found from the result (``check_lse``).

Every error names the argument, what was expected and what was given. The C++ kernels repeat the
checks of the first kind (``csrc/topk/topk_common.cpp``), so a call past these cannot read out of bounds.
"""

from __future__ import annotations

import torch

from .._validation import FLOAT_DTYPES, check_int, check_temperature, check_tensor, first_rows

MAX_K = 1024


def check_inputs(logits, k, temperature) -> float:
    """logits [N, V] float with V >= 1, 1 <= k <= min(V, MAX_K), a temperature in TEMPERATURE_RANGE;
    returns the temperature as a float."""
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one column (V >= 1), got shape {list(logits.shape)}")
    check_int("k", k, low=1, high=min(logits.shape[1], MAX_K))
    return check_temperature("temperature", temperature)


def check_lse(lse: torch.Tensor) -> None:
    """ValueError naming the rows whose lse fp32 [N] is NaN (the logits hold a NaN) or −inf (entirely
    −inf logits): rows without a distribution. One host sync; the message is built on failure only."""
    if bool((torch.isnan(lse) | torch.isneginf(lse)).any()):
        nan_rows = torch.isnan(lse)
        if bool(nan_rows.any()):
            raise ValueError(f"logits rows contain NaN: rows {first_rows(nan_rows)}")
        raise ValueError(f"logits rows are entirely -inf (no distribution): rows {first_rows(torch.isneginf(lse))}")
