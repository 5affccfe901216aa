"""Pseudo-label distillation data: the teacher's top-k pseudo-labels, computed once and stored.

* ``store``: ``PseudoLabelWriter`` / ``PseudoLabelStore`` (sharded safetensors + JSON manifest,
  atomic writes, resume; each shard bound to its samples and the store's metadata, its checksum and
  contents verified on read; the manifest's schema and completeness checked; metadata checked
  against the run).
* ``cache``: ``cache_pseudo_labels`` (run a teacher over a data set into a store), ``teacher_pseudo_labels``.
* ``imported``: ``import_prompt_logprobs`` (top-k log-probabilities of a served or offline teacher, vLLM's
  ``prompt_logprobs``, into a store).
"""

from .cache import cache_pseudo_labels, rows_per_sample, split_rows, teacher_pseudo_labels, write_store
from .imported import ImportSummary, LogprobsError, import_prompt_logprobs, sample_tokens, tempered_rows
from .store import PseudoLabelStore, PseudoLabelWriter, StoreError, StoreMeta

__all__ = [
    "ImportSummary",
    "LogprobsError",
    "PseudoLabelStore",
    "PseudoLabelWriter",
    "StoreError",
    "StoreMeta",
    "cache_pseudo_labels",
    "import_prompt_logprobs",
    "rows_per_sample",
    "sample_tokens",
    "split_rows",
    "teacher_pseudo_labels",
    "tempered_rows",
    "write_store",
]
