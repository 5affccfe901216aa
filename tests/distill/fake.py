"""Deterministic stand-in pseudo-labels for store tests: sample i always gets the same rows."""

from __future__ import annotations

import torch

from clinkd_kernels.topk import PseudoLabels, topk_pseudo_labels_reference

VOCAB = 37
K = 4


def sample_ids(n: int) -> list[str]:
    return [f"ct_{i:04d}_sample" for i in range(n)]


def sample_rows(i: int) -> tuple[PseudoLabels, torch.Tensor]:
    """(PseudoLabels [R, K], targets [R]) of sample i, R = 1 + i % 5, from logits seeded by i."""
    g = torch.Generator().manual_seed(1000 + i)
    rows = 1 + i % 5
    logits = torch.randn(rows, VOCAB, generator=g) * 3
    targets = torch.randint(0, VOCAB, (rows,), generator=g, dtype=torch.int32)
    return topk_pseudo_labels_reference(logits, K, temperature=0.5, compute_dtype=torch.float32), targets


def compute(indices: list[int]):
    return [sample_rows(i) for i in indices]
