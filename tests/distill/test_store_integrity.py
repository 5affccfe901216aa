"""Pseudo-label store integrity: what the writer refuses, and what a reader detects in a store that
was edited, swapped, half-deleted or written by something else."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from clinkd.distill import PseudoLabelStore, PseudoLabelWriter, StoreError, write_store
from clinkd.distill.store import read_manifest
from tests.distill import fake
from tests.distill.helpers import META, assert_store_holds

IDS = fake.sample_ids(6)  # shard_size 2: shards of 3, 7 and 6 rows


def complete_store(folder: Path, n: int = 6, shard_size: int = 2) -> dict:
    assert write_store(folder, META, fake.sample_ids(n), fake.compute, shard_size=shard_size, progress=False)
    return json.loads((folder / "manifest.json").read_text())


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def header_metadata(path: Path) -> dict:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])["__metadata__"]


def resave_shard(folder: Path, s: int, edit) -> None:
    """Rewrite shard s with ``edit(tensors)`` applied and its manifest entry updated to match: a
    well-formed, checksum-valid shard whose content is wrong (what a buggy writer would leave)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["shards"][s]
    path = folder / entry["file"]
    tensors = load(path.read_bytes())
    edit(tensors)
    data = save(tensors, metadata=header_metadata(path))
    path.write_bytes(data)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    write_manifest(folder, manifest)


# ------------------------------------------------------------------ the writer's "complete"


def test_an_id_outside_the_data_set_is_refused_and_complete_needs_every_id(tmp_path):
    writer = PseudoLabelWriter(tmp_path, META, ["a", "b"])
    writer.add("a", *fake.sample_rows(0))
    with pytest.raises(ValueError, match="'zzz' is not in"):
        writer.add("zzz", *fake.sample_rows(1))
    assert writer.close() is False
    manifest = read_manifest(tmp_path)
    assert manifest["complete"] is False and [s["samples"] for s in manifest["shards"]] == [["a"]]
    with pytest.raises(StoreError, match=r"incomplete \(1 of 2 samples\)"):
        PseudoLabelStore(tmp_path)
    writer = PseudoLabelWriter(tmp_path, META, ["a", "b"])
    assert writer.pending == ["b"]
    writer.add("b", *fake.sample_rows(1))
    assert writer.close() is True and read_manifest(tmp_path)["complete"] is True


def test_samples_are_added_in_data_set_order(tmp_path):
    writer = PseudoLabelWriter(tmp_path, META, IDS, shard_size=2)
    with pytest.raises(ValueError, match=rf"{IDS[1]!r} is out of order.*next is {IDS[0]!r}"):
        writer.add(IDS[1], *fake.sample_rows(1))
    with pytest.raises(ValueError, match="sample ids must be str"):
        PseudoLabelWriter(tmp_path / "other", META, [1, 2])


def test_a_manifest_claiming_complete_for_a_partial_store_is_refused(tmp_path):
    writer = PseudoLabelWriter(tmp_path, META, IDS, shard_size=2)
    for i in range(2):
        writer.add(IDS[i], *fake.sample_rows(i))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["complete"] = True
    write_manifest(tmp_path, manifest)
    with pytest.raises(StoreError, match=r"says it is complete.*2 of 6 samples"):
        PseudoLabelStore(tmp_path)


# ------------------------------------------------------------------ every field is checked


def _rows(i: int = 2):
    labels, targets = fake.sample_rows(i)  # sample 2: 3 rows
    return labels, targets


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda pl, t: (pl._replace(logprobs=pl.logprobs[:1]), t), r"logprobs \[1, 4\]"),
        (lambda pl, t: (pl._replace(lse=pl.lse[:2]), t), r"lse \[2\]"),
        (lambda pl, t: (pl._replace(margin=pl.margin[:, None]), t), r"margin \[3, 1\]"),
        (lambda pl, t: (pl._replace(residual=pl.residual.repeat(2)), t), r"residual \[6\]"),
        (lambda pl, t: (pl._replace(logprobs=pl.logprobs[:, :3]), t), r"logprobs \[3, 3\]"),
        (lambda pl, t: (pl._replace(indices=pl.indices[:, :3]), t), r"indices \[3, 3\]"),
        (lambda pl, t: (pl, t[:, None]), r"targets \[3, 1\]"),
        (lambda pl, t: (pl._replace(indices=pl.indices.float()), t), "indices must be an integer tensor"),
        (lambda pl, t: (pl, t.float()), "targets must be an integer tensor"),
        (lambda pl, t: (pl._replace(lse=pl.lse.int()), t), "lse must be a floating-point tensor"),
        (lambda pl, t: (pl._replace(margin=pl.margin.tolist()), t), "margin is not a tensor"),
        (lambda pl, t: (pl._replace(indices=pl.indices + fake.VOCAB), t), r"indices must be in \[0, 37\)"),
        (lambda pl, t: (pl._replace(indices=pl.indices - 40), t), r"indices must be in \[0, 37\)"),
        (lambda pl, t: (pl, t - 100), r"targets must be in \[0, 37\)"),
        (
            lambda pl, t: (pl._replace(logprobs=pl.logprobs.index_fill(0, torch.tensor([1]), float("nan"))), t),
            "logprobs holds NaN",
        ),
        (lambda pl, t: (pl._replace(lse=torch.full_like(pl.lse, float("-inf"))), t), "lse holds NaN or -inf"),
        (lambda pl, t: (tuple(pl)[:4], t), "PseudoLabels"),
    ],
)
def test_add_checks_every_field(tmp_path, edit, message):
    writer = PseudoLabelWriter(tmp_path, META, IDS, shard_size=1)
    labels, targets = edit(*_rows())
    with pytest.raises(ValueError, match=message):
        writer.add(IDS[0], labels, targets)
    assert writer.pending == IDS and not list(tmp_path.glob("shard-*"))
    writer.add(IDS[0], *fake.sample_rows(0))  # a refused sample leaves the writer usable


def test_infinities_the_extraction_produces_are_kept(tmp_path):
    """+inf lse / -inf log-probs are what top-k extraction gives rows with +inf logits: stored as is."""
    labels, targets = _rows()
    labels = labels._replace(
        lse=labels.lse.index_fill(0, torch.tensor([0]), float("inf")),
        logprobs=labels.logprobs.index_fill(0, torch.tensor([1]), float("-inf")),
    )
    writer = PseudoLabelWriter(tmp_path, META, ["x"])
    writer.add("x", labels, targets.long())  # int64 targets / any float dtype are converted
    assert writer.close()
    got, got_targets = PseudoLabelStore(tmp_path).get("x")
    assert torch.equal(got.lse, labels.lse) and torch.equal(got.logprobs, labels.logprobs)
    assert got_targets.dtype == torch.int32 and torch.equal(got_targets, targets)


def _drop(name):
    def edit(t):
        del t[name]

    return edit


def _set(name, fn):
    def edit(t):
        t[name] = fn(t[name])

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop("indices"), "tensors differ from a shard's: missing indices"),
        (_set("logprobs", lambda x: x[:1]), r"logprobs is F32 \[1, 4\], expected F32 \[3, 4\]"),
        (_set("offsets", lambda x: x.int()), r"offsets is I32 \[3\], expected I64 \[3\]"),
        (_set("offsets", lambda x: x[:2]), r"offsets is I64 \[2\], expected I64 \[3\]"),
        (_set("offsets", lambda x: x + 1), "offsets must start at 0"),
        (_set("offsets", lambda x: torch.tensor([0, 1, 2])), "offsets must end at the row count 3"),
        (_set("offsets", lambda x: torch.tensor([0, 4, 3])), "offsets must be non-decreasing"),
        (_set("indices", lambda x: x + 100), r"indices must be in \[0, 37\)"),
        (_set("margin", lambda x: x * float("nan")), "margin holds NaN"),
        (lambda t: t.update(extra=torch.zeros(1)), "unexpected extra"),
    ],
)
def test_a_checksum_valid_shard_with_wrong_tensors_is_refused(tmp_path, edit, message):
    complete_store(tmp_path)
    resave_shard(tmp_path, 0, edit)
    try:
        store = PseudoLabelStore(tmp_path)
    except StoreError as e:  # what the header shows is refused on opening
        assert "shard-00000" in str(e)
        with pytest.raises(StoreError, match=message):
            raise e
        return
    store.get(IDS[2])  # the other shards read fine
    with pytest.raises(StoreError, match=rf"shard-00000.*{message}"):
        store.get(IDS[0])
    with pytest.raises(StoreError, match=message):
        store.verify_all()


# ------------------------------------------------------------------ shards are bound to their samples


def test_shards_swapped_with_their_checksum_entries_are_detected(tmp_path):
    manifest = complete_store(tmp_path, n=8)  # four shards of 3, 7, 6 and 5 rows
    a, b = manifest["shards"][0], manifest["shards"][2]
    data_a, data_b = (tmp_path / a["file"]).read_bytes(), (tmp_path / b["file"]).read_bytes()
    (tmp_path / a["file"]).write_bytes(data_b)
    (tmp_path / b["file"]).write_bytes(data_a)
    for key in ("bytes", "sha256"):
        a[key], b[key] = b[key], a[key]
    write_manifest(tmp_path, manifest)
    with pytest.raises(StoreError, match=r"shard-00000.safetensors does not belong there.*samples"):
        PseudoLabelStore(tmp_path)


def test_ids_edited_in_the_manifest_are_detected(tmp_path):
    manifest = complete_store(tmp_path)
    shards = manifest["shards"]
    shards[0]["samples"], shards[1]["samples"] = shards[1]["samples"], shards[0]["samples"]
    write_manifest(tmp_path, manifest)
    with pytest.raises(StoreError, match="not the data set"):
        PseudoLabelStore(tmp_path)
    # the same edit with the data-set hash recomputed to match: the shards still say whose rows they hold
    from clinkd.distill.store import ids_hash

    manifest["dataset"]["ids_sha256"] = ids_hash([s for shard in shards for s in shard["samples"]])
    write_manifest(tmp_path, manifest)
    with pytest.raises(StoreError, match="shard-00000.safetensors does not belong there"):
        PseudoLabelStore(tmp_path)


def test_meta_edited_in_the_manifest_is_detected(tmp_path):
    manifest = complete_store(tmp_path)
    manifest["meta"]["temperature"] = 1.0  # as if the store were made for another run's settings
    write_manifest(tmp_path, manifest)
    other = META.__class__(**{**META.__dict__, "temperature": 1.0})
    with pytest.raises(StoreError, match="does not belong there.*meta"):
        PseudoLabelStore(tmp_path, expect=other)


# ------------------------------------------------------------------ malformed manifests


def _edit(path, value=None, delete=False):
    def apply(manifest):
        *parents, last = path
        node = manifest
        for key in parents:
            node = node[key]
        if delete:
            del node[last]
        else:
            node[last] = value

    return apply


@pytest.mark.parametrize(
    "edit, message",
    [
        (_edit(["shards"], delete=True), "has no field shards"),
        (_edit(["dataset"], delete=True), "has no field dataset"),
        (_edit(["complete"], delete=True), "has no field complete"),
        (_edit(["meta", "k"], delete=True), "meta has no field k"),
        (_edit(["meta", "temperature"], "0.5"), "meta.temperature must be a number > 0"),
        (_edit(["meta", "temperature"], float("nan")), "meta.temperature must be a number > 0"),
        (_edit(["meta", "k"], 4.0), "meta.k must be an int"),
        (_edit(["meta", "k"], True), "meta.k must be an int"),
        (_edit(["meta", "teacher"], None), "meta.teacher must be a str"),
        (_edit(["meta", "extra"], 1), "meta has unknown field extra"),
        (_edit(["meta"], []), "meta must be an object"),
        (_edit(["dataset", "num_samples"], "6"), "dataset.num_samples must be an int"),
        (_edit(["dataset", "ids_sha256"], "abc"), "dataset.ids_sha256 must be a sha256"),
        (_edit(["complete"], 1), "complete must be true or false"),
        (_edit(["shards"], {}), "shards must be a list"),
        (_edit(["shards", 0], "shard-00000.safetensors"), r"shards\[0\] must be an object"),
        (_edit(["shards", 1, "bytes"], "100"), r"shards\[1\].bytes must be an int"),
        (_edit(["shards", 1, "rows"], -1), r"shards\[1\].rows must be an int >= 0"),
        (_edit(["shards", 1, "sha256"], 5), r"shards\[1\].sha256 must be a sha256"),
        (_edit(["shards", 2, "samples"], "ct_0004_sample"), r"shards\[2\].samples must be a non-empty list of str"),
        (_edit(["shards", 2, "samples"], [4, 5]), r"shards\[2\].samples must be a non-empty list of str"),
        (_edit(["shards", 2, "samples"], []), r"shards\[2\].samples must be a non-empty list of str"),
        (_edit(["shards", 2, "file"], delete=True), r"shards\[2\] has no field file"),
        (_edit(["shards", 2, "file"], "../../etc/hostname"), r"shards\[2\].file must be 'shard-00002.safetensors'"),
        (_edit(["shards", 2, "file"], "shard-00001.safetensors"), r"shards\[2\].file must be 'shard-00002"),
        (_edit(["shards", 2, "file"], ["x"]), r"shards\[2\].file must be 'shard-00002"),
        (_edit(["version"], "2"), "format version '2' is not supported.*rebuild it"),
        (_edit(["version"], 1), "format version 1 is not supported.*rebuild it"),
        (_edit(["format"], "other"), "is not a clinkd-pseudo-labels manifest"),
    ],
)
def test_malformed_manifests_raise_store_errors_that_name_the_field(tmp_path, edit, message):
    manifest = complete_store(tmp_path)
    edit(manifest)
    write_manifest(tmp_path, manifest)
    with pytest.raises(StoreError, match=message):
        PseudoLabelStore(tmp_path)
    with pytest.raises(StoreError, match=message):  # the writer reads it through the same checks
        PseudoLabelWriter(tmp_path, META, IDS, shard_size=2)


def test_a_manifest_file_name_outside_the_folder_is_never_opened(tmp_path):
    store = tmp_path / "store"
    manifest = complete_store(store)
    shutil.copy(store / "shard-00002.safetensors", tmp_path / "outside.safetensors")
    manifest["shards"][2]["file"] = "../outside.safetensors"
    write_manifest(store, manifest)
    (store / "shard-00002.safetensors").unlink()
    with pytest.raises(StoreError, match=r"shards\[2\].file must be 'shard-00002.safetensors', got '../outside"):
        PseudoLabelStore(store)


def test_an_old_format_store_must_be_rebuilt(tmp_path):
    manifest = complete_store(tmp_path)
    manifest["version"] = 1
    write_manifest(tmp_path, manifest)
    with pytest.raises(StoreError, match="format version 1 is not supported.*rebuild it"):
        read_manifest(tmp_path)


# ------------------------------------------------------------------ no valid work is lost


def test_a_deleted_manifest_does_not_discard_the_shards(tmp_path):
    complete_store(tmp_path)
    shards = sorted(p.name for p in tmp_path.glob("shard-*"))
    saved = (tmp_path / "manifest.json").read_bytes()
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(
        StoreError,
        match=r"shard-00000.safetensors, shard-00001.safetensors, shard-00002.safetensors"
        r" but no manifest.json.*Restore manifest.json.*delete",
    ):
        write_store(tmp_path, META, IDS, fake.compute, shard_size=2, progress=False)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == shards
    (tmp_path / "manifest.json").write_bytes(saved)  # restored: everything is still there
    assert_store_holds(PseudoLabelStore(tmp_path, expect=META), 6)


def test_a_new_store_has_a_manifest_before_its_first_shard(tmp_path):
    writer = PseudoLabelWriter(tmp_path, META, IDS, shard_size=4)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    manifest = read_manifest(tmp_path)
    assert manifest["shards"] == [] and manifest["complete"] is False
    writer.add(IDS[0], *fake.sample_rows(0))
    assert PseudoLabelStore(tmp_path, allow_incomplete=True).ids == []
    empty = PseudoLabelWriter(tmp_path / "empty", META, [])
    assert empty.close() and len(PseudoLabelStore(tmp_path / "empty")) == 0


def test_a_resume_refuses_a_store_whose_listed_shard_is_gone(tmp_path):
    writer = PseudoLabelWriter(tmp_path, META, IDS, shard_size=2)
    for i in range(4):
        writer.add(IDS[i], *fake.sample_rows(i))
    (tmp_path / "shard-00001.safetensors").unlink()
    with pytest.raises(StoreError, match="shard-00001.safetensors is missing"):
        PseudoLabelWriter(tmp_path, META, IDS, shard_size=2)
    assert (tmp_path / "shard-00000.safetensors").exists()
