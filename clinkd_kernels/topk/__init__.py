"""Teacher top-k pseudo-labels: indices, log-probs, log-sum-exp, confidence margin, residual mass."""

from clinkd_kernels.topk.op import MAX_K, topk_pseudo_labels
from clinkd_kernels.topk.pseudo_labels import PseudoLabels
from clinkd_kernels.topk.reference import topk_pseudo_labels_reference

__all__ = ["MAX_K", "PseudoLabels", "topk_pseudo_labels", "topk_pseudo_labels_reference"]
