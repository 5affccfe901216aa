"""Pseudo-label store: round trip, kill/resume robustness, checksums, metadata refusal."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clinkd.distill import PseudoLabelStore, PseudoLabelWriter, StoreError, StoreMeta, write_store
from tests.distill import fake

REPO = Path(__file__).resolve().parents[2]
META = StoreMeta(teacher="fake", k=fake.K, temperature=0.5, vocab_size=fake.VOCAB, tokenizer_hash="t0")


def assert_store_holds(store: PseudoLabelStore, n: int) -> None:
    """Every sample exactly once, in data-set order, with exactly the rows it was given."""
    assert store.ids == fake.sample_ids(n)
    for i, sid in enumerate(fake.sample_ids(n)):
        labels, targets = store.get(sid)
        want, want_targets = fake.sample_rows(i)
        for name in labels._fields:
            assert torch.equal(getattr(labels, name), getattr(want, name)), (sid, name)
        assert torch.equal(targets, want_targets)


def test_round_trip_and_batch_order(tmp_path):
    n = 11
    assert write_store(tmp_path, META, fake.sample_ids(n), fake.compute, batch_size=3, shard_size=4, progress=False)
    store = PseudoLabelStore(tmp_path, expect=META)
    store.verify_all()
    assert len(store) == n and len(store.manifest["shards"]) == 3
    assert_store_holds(store, n)
    picked = [7, 2, 9]
    labels, targets = store.batch([fake.sample_ids(n)[i] for i in picked])
    assert torch.equal(targets, torch.cat([fake.sample_rows(i)[1] for i in picked]))
    assert torch.equal(labels.margin, torch.cat([fake.sample_rows(i)[0].margin for i in picked]))


def _run_child(folder: Path, n: int, shard: int, crash_at: int, kill_after: float | None = None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-m", "tests.distill.store_child", str(folder), str(n), str(shard),
                              str(crash_at)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    if kill_after is not None:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(kill_after)
        child.send_signal(signal.SIGKILL)
    out, err = child.communicate(timeout=120)
    return child.returncode, out, err


def test_killed_cache_runs_resume_to_a_complete_store(tmp_path):
    """At least five runs die (SIGKILL) at random points: at a random fsync/rename inside a shard or
    manifest write, or after a random delay. After each death the store holds only whole shards;
    a final run completes it with every sample exactly once."""
    n, shard = 40, 3
    events_per_shard = 6  # shard: fsync, rename, fsync folder; manifest: the same
    rng = random.Random(torch.initial_seed())
    kills, runs = 0, []

    def check_committed_part():
        listed = set()  # a death before the first manifest write leaves nothing committed
        if (tmp_path / "manifest.json").exists():
            store = PseudoLabelStore(tmp_path, allow_incomplete=True, expect=META)
            store.verify_all()  # whatever the manifest lists is whole and checksum-valid
            assert store.ids == fake.sample_ids(n)[:len(store)]
            listed = {s["file"] for s in store.manifest["shards"]}
        leftovers = {p.name for p in tmp_path.iterdir()} - {"manifest.json"} - listed
        assert all(name.startswith("shard-") or name.startswith(".tmp-") for name in leftovers)

    for attempt in range(10):
        if kills >= 5:
            break
        committed = 0
        if (tmp_path / "manifest.json").exists():
            committed = len(PseudoLabelStore(tmp_path, allow_incomplete=True, expect=META))
        remaining = -(-(n - committed) // shard) * events_per_shard
        # Die within the next two shards' writes, so that the store cannot complete before the test
        # has seen enough deaths, whatever the random draws.
        last = max(1, min(remaining - 1, 2 * events_per_shard))
        code, out, err = _run_child(tmp_path, n, shard, rng.randint(1, last))
        runs.append((attempt, remaining, code, out.split()))
        if code == -signal.SIGKILL:
            kills += 1
        else:
            assert code == 0, err
        check_committed_part()
    # An external kill after a random delay: it may land anywhere, or after the run has finished.
    code, out, err = _run_child(tmp_path, n, shard, 0, kill_after=rng.uniform(0.0, 0.05))
    assert code in (0, -signal.SIGKILL), err
    check_committed_part()
    assert kills >= 5, runs
    code, out, err = _run_child(tmp_path, n, shard, 0)
    assert code == 0 and out.splitlines()[1].startswith("complete"), err
    store = PseudoLabelStore(tmp_path, expect=META)
    store.verify_all()
    assert_store_holds(store, n)
    assert {p.name for p in tmp_path.iterdir()} == {"manifest.json"} | {s["file"] for s in store.manifest["shards"]}


def test_resume_discards_a_shard_the_manifest_does_not_list(tmp_path):
    ids = fake.sample_ids(6)
    writer = PseudoLabelWriter(tmp_path, META, ids, shard_size=2)
    for i in range(2):
        writer.add(ids[i], *fake.sample_rows(i))  # flushed: shard-00000 + manifest
    (tmp_path / "shard-00001.safetensors").write_bytes(b"half a shard")  # renamed, manifest never written
    (tmp_path / ".tmp-abc").write_bytes(b"torn")
    writer = PseudoLabelWriter(tmp_path, META, ids, shard_size=2)
    assert writer.pending == ids[2:]
    assert not (tmp_path / ".tmp-abc").exists() and not (tmp_path / "shard-00001.safetensors").exists()
    for i in range(2, 6):
        writer.add(ids[i], *fake.sample_rows(i))
    assert writer.close()
    assert_store_holds(PseudoLabelStore(tmp_path, expect=META), 6)


def _complete_store(folder: Path, n: int = 6) -> None:
    assert write_store(folder, META, fake.sample_ids(n), fake.compute, shard_size=2, progress=False)


def test_truncated_shard_is_detected(tmp_path):
    _complete_store(tmp_path)
    shard = tmp_path / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-9])
    with pytest.raises(StoreError, match=r"shard-00001.*truncated"):
        PseudoLabelStore(tmp_path)


def test_altered_shard_fails_its_checksum_on_read(tmp_path):
    _complete_store(tmp_path)
    shard = tmp_path / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40  # same size, one flipped bit in the tensor data
    shard.write_bytes(bytes(data))
    store = PseudoLabelStore(tmp_path)
    store.get(fake.sample_ids(6)[0])  # other shards read fine
    with pytest.raises(StoreError, match=r"shard-00002.*checksum"):
        store.get(fake.sample_ids(6)[5])
    with pytest.raises(StoreError, match="checksum"):
        store.verify_all()


def test_missing_shard_and_corrupt_manifest(tmp_path):
    _complete_store(tmp_path)
    (tmp_path / "shard-00000.safetensors").unlink()
    with pytest.raises(StoreError, match="shard-00000.safetensors is missing"):
        PseudoLabelStore(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="unreadable"):
        PseudoLabelStore(tmp_path)
    with pytest.raises(StoreError, match="no pseudo-label store"):
        PseudoLabelStore(tmp_path / "nowhere")


@pytest.mark.parametrize("field, value", [("k", fake.K + 1), ("temperature", 1.0), ("vocab_size", fake.VOCAB + 3),
                                          ("tokenizer_hash", "t1"), ("teacher", "other-teacher")])
def test_mismatched_metadata_is_refused(tmp_path, field, value):
    _complete_store(tmp_path)
    other = StoreMeta(**{**META.__dict__, field: value})
    with pytest.raises(StoreError, match=rf"written for another run:\n  {field}: store has"):
        PseudoLabelStore(tmp_path, expect=other)
    with pytest.raises(StoreError, match=field):  # resuming with other settings is refused too
        PseudoLabelWriter(tmp_path, other, fake.sample_ids(6))


def test_other_data_set_and_incomplete_store_are_refused(tmp_path):
    ids = fake.sample_ids(5)
    writer = PseudoLabelWriter(tmp_path, META, ids, shard_size=2)
    for i in range(2):
        writer.add(ids[i], *fake.sample_rows(i))
    with pytest.raises(StoreError, match=r"incomplete \(2 of 5 samples\)"):
        PseudoLabelStore(tmp_path)
    with pytest.raises(StoreError, match="another data set"):
        PseudoLabelWriter(tmp_path, META, fake.sample_ids(6))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["meta"]["k"] == fake.K


def test_writer_input_errors(tmp_path):
    ids = fake.sample_ids(3)
    with pytest.raises(ValueError, match="shard_size"):
        PseudoLabelWriter(tmp_path, META, ids, shard_size=0)
    with pytest.raises(ValueError, match="unique"):
        PseudoLabelWriter(tmp_path, META, ids + ids[:1])
    writer = PseudoLabelWriter(tmp_path, META, ids, shard_size=5)
    labels, targets = fake.sample_rows(0)
    writer.add(ids[0], labels, targets)
    with pytest.raises(ValueError, match="already in the store"):
        writer.add(ids[0], labels, targets)
    with pytest.raises(ValueError, match=r"must be \[R, k=4\]"):
        writer.add(ids[1], labels._replace(indices=labels.indices[:, :2]), targets)
    with pytest.raises(ValueError, match="targets"):
        writer.add(ids[2], labels, targets[:-1] if targets.numel() > 1 else targets.repeat(2))
