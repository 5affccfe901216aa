"""The teacher's sparse distribution per token: top-k pseudo-labels plus the mass they leave out."""

from __future__ import annotations

from typing import NamedTuple

import torch


class PseudoLabels(NamedTuple):
    """Top-k pseudo-labels of N teacher rows (DESIGN.md §3.5).

    indices  int32 [N, k]  token ids by descending probability (ties: lower id first)
    logprobs fp32  [N, k]  log softmax(logits / T) at those ids
    lse      fp32  [N]     logsumexp(logits / T)
    margin   fp32  [N]     p_(1) - p_(2), the teacher's confidence margin
    residual fp32  [N]     1 - sum(exp(logprobs)), the mass outside the top k (clamped at 0)
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    lse: torch.Tensor
    margin: torch.Tensor
    residual: torch.Tensor

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def __getitem__(self, item):
        """Integer → field (tuple behaviour); anything else (a slice, mask or index tensor) → those rows."""
        if isinstance(item, int):
            return tuple.__getitem__(self, item)
        return PseudoLabels(*(t[item] for t in self))

    def to(self, device) -> "PseudoLabels":
        return PseudoLabels(*(t.to(device) for t in self))
