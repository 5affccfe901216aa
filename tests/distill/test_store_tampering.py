"""Tampering with a complete pseudo-label store is always detected.

Each case copies one complete store, alters it (shard files swapped, truncated or with a flipped byte;
the manifest edited: its flag, ids, their order, metadata, sizes, rows, file names, entries deleted or
duplicated, keys removed or added, values of the wrong type, bytes flipped), with hypothesis drawing
what to alter and how. A reader then raises StoreError on opening, or else every ``get`` returns that
sample's own rows or raises StoreError and ``verify_all()`` raises StoreError. Any other exception, or
another sample's values, fails the test.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinkd.distill import PseudoLabelStore, StoreError, write_store
from tests.distill import fake
from tests.distill.helpers import META

N, SHARD = 9, 2  # five shards of 3, 7, 6, 5 and 1 rows; the last holds one sample
IDS = fake.sample_ids(N)
ROWS = {sid: fake.sample_rows(i) for i, sid in enumerate(IDS)}
CASES = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pristine")
    assert write_store(folder, META, IDS, fake.compute, shard_size=SHARD, progress=False)
    return folder


class Tampered:
    """A copy of the pristine store, to alter: ``manifest`` (parsed) is written back by ``save``."""

    def __init__(self, pristine: Path, folder: Path):
        self.folder = folder / "store"
        shutil.copytree(pristine, self.folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        self.shards = self.manifest["shards"]

    def path(self, s: int) -> Path:
        return self.folder / f"shard-{s:05d}.safetensors"

    def save(self) -> None:
        (self.folder / "manifest.json").write_text(json.dumps(self.manifest, indent=1))


def assert_detected(store_folder: Path, expect) -> None:
    try:
        store = PseudoLabelStore(store_folder, expect=expect)
    except StoreError:
        return
    for sid in IDS:
        try:
            labels, targets = store.get(sid)
        except StoreError:
            continue
        want, want_targets = ROWS[sid]  # never another sample's rows
        assert all(torch.equal(getattr(labels, f), getattr(want, f)) for f in labels._fields), sid
        assert torch.equal(targets, want_targets), sid
    with pytest.raises(StoreError):
        store.verify_all()


# ------------------------------------------------------------------ the alterations (t: Tampered, draw)


def two_shards(draw) -> tuple[int, int]:
    i = draw(st.integers(0, 4))
    return i, draw(st.integers(0, 4).filter(lambda j: j != i))


def swap_files(t, draw):
    """Two shard files swapped; optionally their manifest checksum entries (bytes, sha256, rows) too."""
    i, j = two_shards(draw)
    a, b = t.path(i).read_bytes(), t.path(j).read_bytes()
    t.path(i).write_bytes(b)
    t.path(j).write_bytes(a)
    for key in draw(st.sampled_from([(), ("bytes", "sha256"), ("bytes", "sha256", "rows")])):
        t.shards[i][key], t.shards[j][key] = t.shards[j][key], t.shards[i][key]
    t.save()


def swap_entries(t, draw):
    """Two whole manifest entries swapped (files, optionally renamed to match their new place; the
    data-set hash optionally recomputed for the new order of ids)."""
    from clinkd.distill.store import ids_hash

    i, j = two_shards(draw)
    t.shards[i], t.shards[j] = t.shards[j], t.shards[i]
    if draw(st.booleans()):
        t.shards[i]["file"], t.shards[j]["file"] = t.shards[j]["file"], t.shards[i]["file"]
        a, b = t.path(i).read_bytes(), t.path(j).read_bytes()
        t.path(i).write_bytes(b)
        t.path(j).write_bytes(a)
    if draw(st.booleans()):
        t.manifest["dataset"]["ids_sha256"] = ids_hash([sid for s in t.shards for sid in s["samples"]])
    t.save()


def copy_shard(t, draw):
    """One shard file replaced by another, with that one's checksum entries."""
    i, j = two_shards(draw)
    t.path(j).write_bytes(t.path(i).read_bytes())
    t.shards[j].update(bytes=t.shards[i]["bytes"], sha256=t.shards[i]["sha256"])
    t.save()


def truncate_shard(t, draw):
    """A shard cut short; optionally with a manifest entry that matches the cut file."""
    s = draw(st.integers(0, 4))
    data = t.path(s).read_bytes()
    data = data[: draw(st.integers(0, len(data) - 1))]
    t.path(s).write_bytes(data)
    if draw(st.booleans()):
        t.shards[s].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        t.save()


def flip_shard_byte(t, draw):
    s = draw(st.integers(0, 4))
    data = bytearray(t.path(s).read_bytes())
    data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    t.path(s).write_bytes(bytes(data))


def delete_shard_file(t, draw):
    t.path(draw(st.integers(0, 4))).unlink()


def edit_complete(t, draw):
    t.manifest["complete"] = not t.manifest["complete"]
    t.save()


def edit_id(t, draw):
    """One id replaced: by another id of the store, or any other string."""
    s = draw(st.integers(0, 4))
    j = draw(st.integers(0, len(t.shards[s]["samples"]) - 1))
    old = t.shards[s]["samples"][j]
    t.shards[s]["samples"][j] = draw((st.sampled_from(IDS) | st.text(max_size=20)).filter(lambda x: x != old))
    t.save()


def reorder_ids(t, draw):
    """Two ids swapped (within a shard or across shards); optionally the data-set hash recomputed."""
    from clinkd.distill.store import ids_hash

    places = [(s, j) for s, shard in enumerate(t.shards) for j in range(len(shard["samples"]))]
    a = draw(st.sampled_from(places))
    (s1, j1), (s2, j2) = a, draw(st.sampled_from(places).filter(lambda b: b != a))
    t.shards[s1]["samples"][j1], t.shards[s2]["samples"][j2] = t.shards[s2]["samples"][j2], t.shards[s1]["samples"][j1]
    if draw(st.booleans()):
        t.manifest["dataset"]["ids_sha256"] = ids_hash([sid for s in t.shards for sid in s["samples"]])
    t.save()


def edit_meta(t, draw):
    """A metadata field changed to another valid-looking value; returns that metadata (a reader may
    expect it: someone editing a store to pass it off as made for their run)."""
    field = draw(st.sampled_from(["teacher", "k", "temperature", "vocab_size", "tokenizer_hash"]))
    old = t.manifest["meta"][field]
    values = {
        "teacher": st.text(max_size=10),
        "tokenizer_hash": st.text(max_size=10),
        "k": st.integers(1, 64),
        "vocab_size": st.integers(1, 10**6),
        "temperature": st.floats(1e-3, 1e3) | st.sampled_from([0.5 + 1e-12, 1, 2]),
    }[field]
    value = draw(values.filter(lambda v: v != old))
    t.manifest["meta"][field] = value
    t.save()
    return replace(META, **{field: value})


def edit_dataset(t, draw):
    key = draw(st.sampled_from(["num_samples", "ids_sha256"]))
    if key == "num_samples":
        t.manifest["dataset"][key] = draw(st.integers(0, 100).filter(lambda n: n != N))
    else:
        t.manifest["dataset"][key] = draw(
            st.text("0123456789abcdef", min_size=64, max_size=64).filter(
                lambda h: h != t.manifest["dataset"]["ids_sha256"]
            )
        )
    t.save()


def edit_entry(t, draw):
    """A shard's bytes, rows, sha256 or file name changed."""
    s = draw(st.integers(0, 4))
    key = draw(st.sampled_from(["bytes", "rows", "sha256", "file"]))
    old = t.shards[s][key]
    values = {
        "bytes": st.integers(0, 10**6),
        "rows": st.integers(0, 100),
        "sha256": st.text("0123456789abcdef", min_size=64, max_size=64),
        "file": st.sampled_from(
            [
                "../x",
                "../../etc/hostname",
                "/etc/hostname",
                "shard-0.safetensors",
                "",
                ".",
                "sub/shard-00000.safetensors",
                "manifest.json",
                "shard-00000.safetensors",
                "shard-00001.safetensors",
                "shard-00004.safetensors",
                f"shard-{s:06d}.safetensors",
            ]
        )
        | st.text(max_size=30),
    }[key]
    t.shards[s][key] = draw(values.filter(lambda v: v != old))
    t.save()


def delete_entry(t, draw):
    """A shard entry removed; optionally the manifest then says it is incomplete."""
    del t.shards[draw(st.integers(0, 4))]
    if draw(st.booleans()):
        t.manifest["complete"] = False
    t.save()


def duplicate_entry(t, draw):
    s = draw(st.integers(0, 4))
    t.shards.insert(draw(st.integers(0, 5)), copy.deepcopy(t.shards[s]))
    t.save()


def _paths(node, prefix=()):
    """Every place in the manifest: (key or index, ...) from the top."""
    if prefix:
        yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from _paths(value, prefix + (key,))


def _at(manifest, path):
    node = manifest
    for key in path:
        node = node[key]
    return node


def _parent(manifest, path):
    return _at(manifest, path[:-1])


def remove_key(t, draw):
    path = draw(st.sampled_from([p for p in _paths(t.manifest) if isinstance(p[-1], str)]))
    del _parent(t.manifest, path)[path[-1]]
    t.save()


def add_key(t, draw):
    objects = [()] + [p for p in _paths(t.manifest) if isinstance(_at(t.manifest, p), dict)]
    node = _at(t.manifest, draw(st.sampled_from(objects)))
    node[draw(st.text(max_size=8).filter(lambda k: k not in node))] = draw(JSON)
    t.save()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)


def wrong_type(t, draw):
    """Any value of the manifest (a field, an id, an entry, a list) replaced by a value of another type."""
    path = draw(st.sampled_from(list(_paths(t.manifest))))
    parent = _parent(t.manifest, path)
    old = parent[path[-1]]
    parent[path[-1]] = draw(JSON.filter(lambda v: type(v) is not type(old)))
    t.save()


def flip_manifest_byte(t, draw):
    """A byte of manifest.json altered (changes that leave the same JSON are not tampering)."""
    from hypothesis import assume

    path = t.folder / "manifest.json"
    data = bytearray(path.read_bytes())
    data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    try:
        assume(json.loads(bytes(data)) != t.manifest)
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    path.write_bytes(bytes(data))


def cut_manifest(t, draw):
    path = t.folder / "manifest.json"
    data = path.read_bytes()
    path.write_bytes(data[: draw(st.integers(0, len(data) - 1))])


TAMPERS = [
    swap_files,
    swap_entries,
    copy_shard,
    truncate_shard,
    flip_shard_byte,
    delete_shard_file,
    edit_complete,
    edit_id,
    reorder_ids,
    edit_meta,
    edit_dataset,
    edit_entry,
    delete_entry,
    duplicate_entry,
    remove_key,
    add_key,
    wrong_type,
    flip_manifest_byte,
    cut_manifest,
]


@pytest.mark.parametrize("tamper", TAMPERS, ids=[f.__name__ for f in TAMPERS])
@CASES
@given(data=st.data())
def test_tampering_is_detected(pristine, tamper, data):
    with tempfile.TemporaryDirectory(dir=pristine.parent) as scratch:
        t = Tampered(pristine, Path(scratch))
        edited_meta = tamper(t, data.draw)
        expect = data.draw(st.sampled_from([None, META] + [edited_meta] * (edited_meta is not None)), label="expect")
        assert_detected(t.folder, expect)


def test_the_pristine_store_reads_back(pristine):
    store = PseudoLabelStore(pristine, expect=META)
    store.verify_all()
    assert store.ids == IDS and len(store.manifest["shards"]) == 5
    for sid in IDS:
        labels, targets = store.get(sid)
        assert torch.equal(labels.logprobs, ROWS[sid][0].logprobs) and torch.equal(targets, ROWS[sid][1])
