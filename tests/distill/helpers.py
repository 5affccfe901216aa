"""Shared pieces of the store tests: the metadata of a fake store, and what a store must hold."""

from __future__ import annotations

import torch

from clinkd.distill import PseudoLabelStore, StoreMeta
from tests.distill import fake

META = StoreMeta(teacher="fake", k=fake.K, temperature=0.5, vocab_size=fake.VOCAB, tokenizer_hash="t0")


def assert_store_holds(store: PseudoLabelStore, n: int) -> None:
    """Exactly the first n samples of the data set, each once, in data-set order, with exactly the rows it was given."""
    assert store.ids == fake.sample_ids(n)
    for i, sid in enumerate(fake.sample_ids(n)):
        labels, targets = store.get(sid)
        want, want_targets = fake.sample_rows(i)
        for name in labels._fields:
            assert torch.equal(getattr(labels, name), getattr(want, name)), (sid, name)
        assert torch.equal(targets, want_targets)
