"""``clinkd distill cache``: run the teacher once over a data set and store its pseudo-labels.

    meta = StoreMeta(teacher="path/or/name", k=64, temperature=0.5, vocab_size=student_vocab,
                     tokenizer_hash=tokenizer_fingerprint(processor.tokenizer))
    cache_pseudo_labels(teacher, dataset, collator, "runs/x/pseudo_labels", meta=meta, batch_size=4)

Per batch: the teacher's final hidden states at the supervised next-token rows → logits restricted to
the first ``vocab_size`` columns (teacher columns past the student's vocabulary are dropped, as the
loss does) → ``topk_pseudo_labels(logits, k, temperature)``, in row chunks so the [rows × V] logits
never exist for the whole batch. Samples already in the store are skipped (resume).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from clinkd_kernels.topk import PseudoLabels, topk_pseudo_labels

from .store import PseudoLabelWriter, StoreMeta


def write_store(
    path: str | os.PathLike,
    meta: StoreMeta,
    ids: Sequence[str],
    compute: Callable[[list[int]], list[tuple[PseudoLabels, torch.Tensor]]],
    *,
    batch_size: int = 8,
    shard_size: int = 256,
    progress: bool = True,
) -> bool:
    """Fill (or resume) the store at ``path``: ``compute(indices)`` returns, for those sample
    indices, each sample's (PseudoLabels [R, k], targets [R]). Returns whether the store is complete."""
    from tqdm.auto import tqdm

    writer = PseudoLabelWriter(path, meta, list(ids), shard_size=shard_size)
    position = {sid: i for i, sid in enumerate(ids)}
    todo = [position[sid] for sid in writer.pending]
    bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc="pseudo-labels", unit="sample", disable=not progress)
    for a in range(0, len(todo), batch_size):
        chunk = todo[a : a + batch_size]
        for index, (labels, targets) in zip(chunk, compute(chunk)):
            writer.add(ids[index], labels, targets)
        bar.update(len(chunk))
    bar.close()
    return writer.close()


def rows_per_sample(batch: dict, ignore_index: int = -100) -> list[int]:
    """How many supervised next-token rows each sample of a (padded or packed) batch has, in row order."""
    labels = batch["labels"]
    valid = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[:, 1:] != ignore_index
    if "packed_lengths" in batch:
        counts, start = [], 0
        for length in batch["packed_lengths"].tolist():
            counts.append(int(valid[0, start : start + length].sum()))
            start += length
        return counts
    return valid.sum(1).tolist()


@torch.no_grad()
def teacher_rows(teacher, batch: dict, rows: torch.Tensor, vocab_size: int):
    """The teacher's final hidden states at ``rows`` of the flattened [B·S] batch and its lm_head module:
    (hidden [N, Hd_t], head). Through the teacher's own forward (logits for one position only), so an
    engine that shards it (FSDP2, ZeRO-3) gathers what that forward needs; read the head's weight inside
    its forward (``clinkd.patch.call_in_forward``). ValueError if V_t < vocab_size."""
    from ..data.collate import model_inputs

    inputs = {k: v for k, v in model_inputs(_unwrapped(teacher), batch).items() if k not in ("labels", "shift_labels")}
    inputs.update(output_hidden_states=True, logits_to_keep=1, use_cache=False)
    hidden = teacher(**inputs).hidden_states[-1]
    head = _unwrapped(teacher).get_output_embeddings()
    if head.out_features < vocab_size:
        raise ValueError(f"the teacher's vocabulary ({head.out_features}) is smaller than the student's ({vocab_size})")
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.to(hidden.device)), head


def _unwrapped(model):
    """The model inside an engine's wrapper (DeepSpeed's engine keeps it as ``.module``)."""
    return getattr(model, "module", model)


def head_pseudo_labels(
    head,
    hidden: torch.Tensor,
    *,
    k: int,
    temperature: float,
    vocab_size: int,
    chunk_rows: int = 1024,
    backend: str | None = None,
) -> PseudoLabels:
    """``chunked_pseudo_labels`` of ``head``'s logits on ``hidden``, run inside the head's forward."""
    from clinkd.patch.head import call_in_forward, check_full_weight

    def inside(head, hidden):
        check_full_weight(head.weight, "the teacher's lm_head.weight")
        return chunked_pseudo_labels(
            hidden,
            head.weight,
            head.bias,
            k=k,
            temperature=temperature,
            vocab_size=vocab_size,
            chunk_rows=chunk_rows,
            backend=backend,
        )

    return call_in_forward(head, inside, hidden)


@torch.no_grad()
def chunked_pseudo_labels(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias,
    *,
    k: int,
    temperature: float,
    vocab_size: int,
    chunk_rows: int = 1024,
    backend: str | None = None,
) -> PseudoLabels:
    """``topk_pseudo_labels`` of the logits hidden·W[:V]ᵀ + b[:V] ([N, Hd_t] rows, first ``vocab_size``
    columns), ``chunk_rows`` rows at a time so the [N × V] logits never exist whole."""
    weight = weight[:vocab_size]
    bias = None if bias is None else bias[:vocab_size]
    parts = []
    for a in range(0, hidden.shape[0], chunk_rows):
        logits = torch.nn.functional.linear(hidden[a : a + chunk_rows], weight, bias)
        parts.append(topk_pseudo_labels(logits.float(), k, temperature=temperature, backend=backend))
    if not parts:
        empty = topk_pseudo_labels(torch.zeros(1, vocab_size, device=hidden.device), k, temperature=temperature)
        parts = [PseudoLabels(*(t[:0] for t in empty))]
    return PseudoLabels(*(torch.cat([getattr(p, f) for p in parts]) for f in PseudoLabels._fields))


@torch.no_grad()
def teacher_pseudo_labels(
    teacher,
    batch: dict,
    *,
    k: int,
    temperature: float,
    vocab_size: int,
    chunk_rows: int = 1024,
    backend: str | None = None,
) -> tuple[PseudoLabels, torch.Tensor]:
    """The teacher's pseudo-labels at a batch's supervised next-token rows: (PseudoLabels [N, k], targets [N]).

    teacher: a Qwen2-VL ``*ForConditionalGeneration`` (patched or not); batch: a collated batch on its
    device. Only the first ``vocab_size`` logit columns are used (ValueError if the teacher has fewer).
    """
    from clinkd.patch import next_token_targets

    rows, targets = next_token_targets(batch["labels"])
    hidden, head = teacher_rows(teacher, batch, rows, vocab_size)
    labels = head_pseudo_labels(
        head, hidden, k=k, temperature=temperature, vocab_size=vocab_size, chunk_rows=chunk_rows, backend=backend
    )
    return labels, targets.to(labels.indices.device)


def split_rows(
    labels: PseudoLabels, targets: torch.Tensor, counts: list[int]
) -> list[tuple[PseudoLabels, torch.Tensor]]:
    """Cut a batch's rows into per-sample pieces of ``counts`` rows."""
    out, start = [], 0
    for n in counts:
        out.append((labels[start : start + n], targets[start : start + n]))
        start += n
    return out


def cache_pseudo_labels(
    teacher,
    dataset,
    collator,
    path: str | os.PathLike,
    *,
    meta: StoreMeta,
    batch_size: int = 4,
    shard_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = True,
    backend: str | None = None,
) -> bool:
    """Run ``teacher`` (eval mode, no gradients) over ``dataset`` (a ``ClinKDDataset``) and write its
    pseudo-labels to the store at ``path``, resuming it if it exists. Returns whether it is complete."""
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()

    def compute(indices: list[int]):
        batch = collator([dataset[i] for i in indices])
        batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
        labels, targets = teacher_pseudo_labels(
            teacher, batch, k=meta.k, temperature=meta.temperature, vocab_size=meta.vocab_size, backend=backend
        )
        return split_rows(labels, targets, rows_per_sample(batch))

    try:
        return write_store(
            path, meta, dataset.ids, compute, batch_size=batch_size, shard_size=shard_size, progress=progress
        )
    finally:
        teacher.train(was_training)
