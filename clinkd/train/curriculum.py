"""The confidence-margin curriculum for the KD term.

The ClinKD paper's v4 rule ("Adaptive Confidence-Margin Curriculum Pseudo-KD") was not available;
this is the rule clinkd implements:

    margin_i  = p_(1) − p_(2), the teacher's top-1 minus top-2 probability at token i (at the KD temperature)
    f(step)   = f0 + (1 − f0) · min(1, step / warmup_steps)          (f0 = start_fraction, default 0.5)
    n_keep    = ceil(f(step) · N)                                     (N supervised tokens in the batch)
    w_i       = 1 for the n_keep tokens of largest margin, else 0     (ties: earlier token first)

The weights go to ``token_weights`` of ``linear_kd_loss``: the KD term averages over the kept tokens
(Σ w_i KD_i / Σ w_i), so early in training the student is distilled only on the tokens the teacher
is most sure of, widening linearly to every supervised token after ``warmup_steps`` optimizer steps.
The CE term always covers every supervised token. warmup_steps = 0 (or f0 = 1) turns it off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MarginCurriculum:
    """start_fraction f0 in (0, 1]; warmup_steps >= 0 (optimizer steps until every token is used)."""

    start_fraction: float = 0.5
    warmup_steps: int = 100

    def __post_init__(self):
        if (
            isinstance(self.start_fraction, bool)
            or not isinstance(self.start_fraction, (int, float))
            or not 0.0 < float(self.start_fraction) <= 1.0
        ):
            raise ValueError(f"curriculum start_fraction must be in (0, 1], got {self.start_fraction!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"curriculum warmup_steps must be an int >= 0, got {self.warmup_steps!r}")

    def fraction(self, step: int) -> float:
        """f(step): the fraction of a batch's supervised tokens the KD term uses at optimizer step ``step``."""
        if self.warmup_steps == 0:
            return 1.0
        f0 = float(self.start_fraction)
        return f0 + (1.0 - f0) * min(1.0, max(0, step) / self.warmup_steps)

    def weights(self, margin: torch.Tensor, step: int) -> torch.Tensor:
        """margin [N] (supervised tokens) → weights [N] fp32 of 0/1 (see ``margin_weights``)."""
        return margin_weights(margin, self.fraction(step))


def margin_weights(margin: torch.Tensor, fraction: float) -> torch.Tensor:
    """Weight 1 for the ceil(fraction·N) tokens with the largest margin (ties: lower index first), else 0.

    margin: [N] floats; fraction in (0, 1]. Returns fp32 [N] on margin's device.
    """
    if margin.dim() != 1:
        raise ValueError(f"margin must be [N], got shape {list(margin.shape)}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = margin.shape[0]
    weights = torch.zeros(n, dtype=torch.float32, device=margin.device)
    keep = min(n, math.ceil(fraction * n - 1e-9))
    if keep == n:
        return weights.fill_(1.0)
    order = torch.sort(margin.float(), descending=True, stable=True).indices
    weights[order[:keep]] = 1.0
    return weights
