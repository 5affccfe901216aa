"""Pseudo-label store: round trip, kill/resume robustness, checksums, metadata refusal."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from clinkd.distill import PseudoLabelStore, PseudoLabelWriter, StoreError, StoreMeta, write_store
from clinkd.distill.store import read_manifest
from tests.distill import fake
from tests.distill.helpers import META, assert_store_holds

REPO = Path(__file__).resolve().parents[2]


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


class _Driver:
    """tests/distill/store_child.py in a subprocess (the store imported once): one forked writer per run."""

    def __init__(self, folder: Path):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.stderr = open(folder / "driver.stderr", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.distill.store_child"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        self.watchdog = threading.Timer(120, self.proc.kill)  # a hung driver fails the test, never blocks it
        self.watchdog.start()
        assert self.proc.stdout.readline().strip() == "ready", self.errors()

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def run(
        self, folder: Path, n: int, shard: int, *, crash_at: int = 0, kill_after: float = -1.0, pace: float = 0.0
    ) -> str:
        assert " " not in str(folder)
        self.proc.stdin.write(f"{folder} {n} {shard} {crash_at} {kill_after} {pace}\n")
        self.proc.stdin.flush()
        fate = self.proc.stdout.readline().strip()
        assert fate in ("killed", "complete"), (fate, self.errors())
        return fate

    def close(self) -> None:
        self.watchdog.cancel()
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.stderr.close()


def _committed(folder: Path) -> int | None:
    """How many samples the store's manifest lists (None: no manifest yet)."""
    manifest = read_manifest(folder) if folder.exists() else None
    return None if manifest is None else sum(len(s["samples"]) for s in manifest["shards"])


def _check_committed_part(folder: Path, n: int) -> None:
    """After any death: the manifest lists only whole, valid shards holding the first samples with
    their own values; any other file is a leftover the next run discards; no shard without a manifest."""
    names = {p.name for p in folder.iterdir()} if folder.exists() else set()
    if "manifest.json" not in names:  # died creating the store: at most a temporary file
        assert all(name.startswith(".tmp-") for name in names), names
        return
    store = PseudoLabelStore(folder, allow_incomplete=True, expect=META)
    store.verify_all()
    assert store.ids == fake.sample_ids(n)[: len(store)]
    assert_store_holds(store, len(store))
    listed = {s["file"] for s in store.manifest["shards"]}
    leftovers = names - {"manifest.json"} - listed
    assert all(name.startswith(".tmp-") or re.fullmatch(r"shard-\d{5}\.safetensors", name) for name in leftovers)


def test_killed_writers_resume_to_a_complete_store(tmp_path):
    """Writers die (SIGKILL) at 20+ random points over several stores of random sizes and shard sizes:
    at a random fsync/rename of a shard or manifest write, or after a random time. After each death
    the committed part is whole and valid; after the last, a run completes the store with every sample
    exactly once, holding exactly its own rows."""
    rng = random.Random(torch.initial_seed())
    driver = _Driver(tmp_path)
    kills = {"event": 0, "time": 0}
    pace = 0.002  # seconds per batch of 2 samples, so that a timed kill lands inside a run
    try:
        for scenario in range(12):
            if scenario >= 3 and sum(kills.values()) >= 24 and min(kills.values()) >= 6:
                break
            n, shard = rng.randint(12, 40), rng.randint(1, 5)
            folder = tmp_path / f"store{scenario}"
            for _ in range(12):
                committed = _committed(folder)
                pending = n - (committed or 0)
                if pending == 0:
                    break
                # fsync + rename + fsync of the folder per atomic write: the new store's manifest, then
                # per shard the shard and the manifest. Die within the next two shards' writes.
                events = 3 * (committed is None) + 6 * -(-pending // shard)
                if rng.random() < 0.5:
                    kind, fate = "event", driver.run(folder, n, shard, crash_at=rng.randint(1, min(events, 12)))
                else:  # at most the time its batches sleep: the run cannot have finished
                    delay = rng.uniform(0.0, pace * -(-pending // 2))
                    kind, fate = "time", driver.run(folder, n, shard, kill_after=delay, pace=pace)
                kills[kind] += fate == "killed"
                _check_committed_part(folder, n)
            assert driver.run(folder, n, shard) == "complete"
            store = PseudoLabelStore(folder, expect=META)
            store.verify_all()
            assert_store_holds(store, n)
            listed = {s["file"] for s in store.manifest["shards"]}
            assert {p.name for p in folder.iterdir()} == {"manifest.json"} | listed  # leftovers discarded
    finally:
        driver.close()
    assert sum(kills.values()) >= 20 and min(kills.values()) >= 5, kills


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


ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0  # permissions do not stop root


def as_owner(monkeypatch):
    """As root, os.access grants everything; this stands in the answer the folder's owner (not root)
    would get, from the owner's mode bits, so a chmod'ed folder is refused the way a user sees it."""
    import stat

    import clinkd.distill.store as store

    bits = {os.R_OK: stat.S_IRUSR, os.W_OK: stat.S_IWUSR, os.X_OK: stat.S_IXUSR}

    def access(path, mode, **kw):
        try:
            have = os.stat(path).st_mode
        except OSError:
            return False
        return all(have & bit for flag, bit in bits.items() if mode & flag)

    monkeypatch.setattr(store.os, "access", access)


def _bad_path(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """A store path that cannot be used, and the words its error must hold."""
    if kind == "file":
        (tmp_path / "a_file").write_text("x")
        return tmp_path / "a_file", "the path is a file, not a folder"
    if kind == "under-a-file":
        (tmp_path / "a_file").write_text("x")
        return tmp_path / "a_file" / "store", "the folder cannot be created"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    return link, "the path is a symbolic link to .*nowhere, which does not exist"


@pytest.mark.parametrize("kind", ["file", "under-a-file", "dangling-link"])
def test_store_paths_that_cannot_be_a_store(tmp_path, kind):
    """Before: the writer raised a bare FileExistsError (a file, a dangling link) or NotADirectoryError,
    naming neither the store nor the problem; the reader said the manifest was missing."""
    path, words = _bad_path(kind, tmp_path)
    with pytest.raises(StoreError, match=rf"^pseudo-label store {re.escape(str(path))}: {words}"):
        PseudoLabelWriter(path, META, fake.sample_ids(3))
    if kind != "under-a-file":
        with pytest.raises(StoreError, match=rf"^pseudo-label store {re.escape(str(path))}: {words}"):
            PseudoLabelStore(path)
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("mode, refused", [(0o000, "writer reader"), (0o500, "writer"), (0o300, "writer reader")])
def test_store_folder_without_permission(tmp_path, monkeypatch, mode, refused):
    """Before: a PermissionError traceback from deep in the writer (or the reader's "manifest is
    unreadable"). Now the folder and what may not be done there are named. As root the kernel grants
    everything, so the owner's answer (from the mode bits) stands in for os.access."""
    _complete_store(tmp_path / "store")
    folder = tmp_path / "store"
    if ROOT_USER:
        as_owner(monkeypatch)
    folder.chmod(mode)
    try:
        for who, call, what in (
            ("writer", lambda: PseudoLabelWriter(folder, META, fake.sample_ids(6)), "read and write"),
            ("reader", lambda: PseudoLabelStore(folder), "read"),
        ):
            if who in refused:
                with pytest.raises(
                    StoreError,
                    match=rf"^pseudo-label store {re.escape(str(folder))}: no permission to {what} the folder",
                ):
                    call()
            else:
                assert call().manifest["complete"]
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize(
    "field, value",
    [
        ("k", fake.K + 1),
        ("temperature", 1.0),
        ("vocab_size", fake.VOCAB + 3),
        ("tokenizer_hash", "t1"),
        ("teacher", "other-teacher"),
    ],
)
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
    with pytest.raises(ValueError, match=r"must be indices \[R, k=4\]"):
        writer.add(ids[1], labels._replace(indices=labels.indices[:, :2]), targets)
    with pytest.raises(ValueError, match="targets"):
        writer.add(ids[1], labels, targets[:-1] if targets.numel() > 1 else targets.repeat(2))
