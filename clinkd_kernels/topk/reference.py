"""Plain PyTorch reference for top-k pseudo-label extraction (the spec the kernels are tested against).

For one row of logits x[0..V) at temperature T, with y = x / T:

    lse       = log Σ_v exp(y_v)
    logprob_v = y_v − lse
    indices   = the k ids with the largest y (in fp32), by descending y, ties broken by the lower id
    margin    = p_(1) − p_(2)              (p = exp(logprob); needs the 2nd value even when k = 1)
    residual  = max(0, 1 − Σ_{j<k} p_j)

Infinities follow the limit of the softmax: if a row holds c > 0 entries equal to +inf, those each
get probability 1/c (logprob −log c), every other entry probability 0 (logprob −inf), and lse = +inf.
−inf entries get probability 0. A row that is entirely −inf (lse = −inf) or holds a NaN (lse = NaN)
has no distribution; the public op raises ValueError for it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class PseudoLabels(NamedTuple):
    """Top-k pseudo-labels of N teacher rows: what ``topk_pseudo_labels`` returns and the losses take.

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

    def to(self, device) -> PseudoLabels:
        return PseudoLabels(*(t.to(device) for t in self))


def topk_pseudo_labels_reference(
    logits: torch.Tensor, k: int, *, temperature: float = 1.0, compute_dtype: torch.dtype = torch.float64
) -> PseudoLabels:
    """logits [N, V] (any float dtype) → PseudoLabels, computed in ``compute_dtype`` then returned as
    int32 indices and fp32 values (or ``compute_dtype`` values when it is float64, for tests)."""
    n, v = logits.shape
    y = logits.to(compute_dtype) / temperature
    posinf = torch.isposinf(y)
    n_posinf = posinf.sum(-1)
    has_posinf = n_posinf > 0

    lse = torch.logsumexp(y.masked_fill(has_posinf[:, None], 0.0), dim=-1)
    lse = torch.where(has_posinf, torch.full_like(lse, float("inf")), lse)
    lse = torch.where(torch.isnan(y).any(-1), torch.full_like(lse, float("nan")), lse)

    # Ranking uses y in fp32, as the kernels compute it, so that two logits that only differ below fp32
    # resolution after the division tie (and are then ordered by id) in both. A stable sort on
    # descending y keeps equal values in id order.
    y32 = logits.float() / temperature
    y32 = y32.masked_fill(torch.isnan(y32), float("-inf"))
    order = torch.sort(y32, dim=-1, descending=True, stable=True).indices
    kk = max(k, 2) if v >= 2 else k
    top = order[:, :kk]
    y_top = torch.gather(y, 1, top)
    logprob = y_top - lse[:, None]
    inf_logprob = torch.where(
        torch.isposinf(y_top), -torch.log(n_posinf.to(compute_dtype))[:, None], torch.full_like(y_top, float("-inf"))
    )
    logprob = torch.where(has_posinf[:, None], inf_logprob, logprob)

    p = logprob.exp()
    margin = p[:, 0] - p[:, 1] if kk >= 2 else p[:, 0]
    residual = (1.0 - p[:, :k].sum(-1)).clamp_min(0.0)
    out_dtype = compute_dtype if compute_dtype == torch.float64 else torch.float32
    return PseudoLabels(
        top[:, :k].to(torch.int32),
        logprob[:, :k].to(out_dtype),
        lse.to(out_dtype),
        margin.to(out_dtype),
        residual.to(out_dtype),
    )
