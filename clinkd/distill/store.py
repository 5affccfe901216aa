"""The pseudo-label store: a teacher's top-k pseudo-labels per sample, on disk, checked on every read.

Layout of a store folder (format version 2):

    manifest.json                 what is committed: written when the store is created (before any
                                  shard), then replaced after each new shard is in place
    shard-00000.safetensors       shard s: the next ``shard_size`` samples of the data set, in order
    shard-00001.safetensors       (the only file names a manifest may list: shard s is shard-{s:05d})
    ...

A shard holds, for its n samples in data-set order, one row per supervised next-token position (the
rows ``next_token_targets`` keeps, in sequence order), concatenated:

    indices  int32 [R, k]   logprobs fp32 [R, k]   lse fp32 [R]   margin fp32 [R]   residual fp32 [R]
    targets  int32 [R]      the token each row predicts (checked against the student's batch)
    offsets  int64 [n + 1]  sample j owns rows offsets[j]:offsets[j+1] (0, non-decreasing, ..., R)

and, in its safetensors metadata (covered by its sha256), what binds it to its place: the format and
version, its index s, its sample ids in order, R, the store's metadata and the data set (sample count
and the hash of the ids in order).

The manifest records the metadata a reader must agree with (teacher id, k, temperature, vocabulary
size, tokenizer fingerprint), the data set (sample count and ``ids_hash`` of the ids in order),
``complete``, and per shard its file name, byte size, sha256, row count and sample ids. Samples are
committed in data-set order, so a store is complete exactly when its shards' ids, concatenated, are
the data set: ``complete`` is derived from the ids and must agree with them.

What is verified, and when (every failure is a ``StoreError`` that says what and where):

* reading a manifest (``PseudoLabelStore``, ``PseudoLabelWriter``, ``read_manifest``): its whole
  schema (``_validate_manifest``: every field, its type and range, no unknown fields, file names
  exactly the writer's, so nothing outside the folder is ever opened), no id listed twice, the shards
  hold no more samples than the data set, and ``complete`` agrees with the ids. A store of another
  format version must be rebuilt.
* opening (a reader, or a writer resuming): the metadata against the run's (``expect``), then for
  every listed shard: the file exists with the listed size, and its header (read alone, not the
  tensors) carries exactly the index, ids, row count, metadata and data set the manifest gives it, and
  tensors of the expected names, dtypes and shapes — so swapped, replaced or re-listed shards and an
  edited manifest (ids, their order, metadata, rows, data set) are refused before anything is read.
* loading a shard (the first ``get`` of one of its samples; ``verify_all`` loads all): the sha256 of
  the whole file, then the header again and the tensors: dtypes and shapes, offsets (0,
  non-decreasing, R), indices and targets in [0, vocab_size), no NaN, lse never -inf.
* adding a sample (the writer): it is the next sample of the data set (an id outside it, twice, or out
  of order is a ValueError), and its fields are tensors of the right kind and shape (indices and
  targets integer, the rest floating; indices and logprobs [R, k], the others [R]) and values (as on
  loading). +inf lse and -inf log-probs (rows with +inf logits) are valid and kept.

Writes go to a temporary file that is fsynced and renamed, and the manifest is replaced only after its
shard is in place: a run killed at any point leaves the last manifest, which names only whole,
checksummed shards. Resuming skips the samples that manifest lists; files it does not list (a shard
renamed before its manifest, a temporary file) are discarded. Shard files without a manifest cannot
come from a crash (the manifest exists before the first shard): the writer refuses such a folder and
names the files, rather than discarding them or trusting them unverified.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from clinkd.io import write_bytes_atomic
from clinkd_kernels.topk import PseudoLabels

FORMAT = "clinkd-pseudo-labels"
VERSION = 2
MANIFEST = "manifest.json"
_FIELDS = PseudoLabels._fields  # ("indices", "logprobs", "lse", "margin", "residual")
_ROWS = (*_FIELDS, "targets")  # the per-row tensors of a sample or a shard
_INTEGER = ("indices", "targets")
_DTYPES = {
    "indices": ("I32", torch.int32),
    "targets": ("I32", torch.int32),
    "offsets": ("I64", torch.int64),
    **{name: ("F32", torch.float32) for name in _FIELDS[1:]},
}
_SHARD_FILE = re.compile(r"shard-\d{5,}\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REBUILD = "rebuild it (delete the folder, then clinkd distill cache)"


class StoreError(ValueError):
    """A store that cannot be used: corrupt, incomplete, or written for another run."""


@dataclass(frozen=True)
class StoreMeta:
    """What pseudo-labels depend on. teacher: an id (path or name); k: labels per row; temperature:
    the softmax temperature they were extracted at; vocab_size: the (student) vocabulary they index;
    tokenizer_hash: ``tokenizer_fingerprint`` of the tokenizer that made the token ids."""

    teacher: str
    k: int
    temperature: float
    vocab_size: int
    tokenizer_hash: str

    def mismatches(self, other: StoreMeta) -> list[str]:
        out = []
        for name, mine in asdict(self).items():
            theirs = getattr(other, name)
            same = abs(mine - theirs) <= 1e-9 * max(1.0, abs(mine)) if name == "temperature" else mine == theirs
            if not same:
                out.append(f"{name}: store has {mine!r}, this run has {theirs!r}")
        return out


def ids_hash(ids: list[str]) -> str:
    """sha256 of the ids in order, as a JSON list (unambiguous whatever characters the ids hold)."""
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


# ------------------------------------------------------------------ the manifest's schema


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _object(value, keys: tuple[str, ...], where: str, fail) -> dict:
    """``value`` as a JSON object with exactly ``keys``."""
    if not isinstance(value, dict):
        raise fail(f"{where} must be an object, got {type(value).__name__}")
    for key in keys:
        if key not in value:
            raise fail(f"{where} has no field {key}")
    extra = sorted(str(key) for key in value if key not in keys)
    if extra:
        raise fail(f"{where} has unknown field{'s' if len(extra) > 1 else ''} {', '.join(extra)}")
    return value


def _meta_from(value, where: str, fail) -> StoreMeta:
    value = _object(value, tuple(StoreMeta.__dataclass_fields__), where, fail)
    for key in ("teacher", "tokenizer_hash"):
        if not isinstance(value[key], str):
            raise fail(f"{where}.{key} must be a str, got {value[key]!r}")
    for key in ("k", "vocab_size"):
        if not _is_int(value[key], 1):
            raise fail(f"{where}.{key} must be an int >= 1, got {value[key]!r}")
    if value["k"] > value["vocab_size"]:
        raise fail(f"{where}.k={value['k']} exceeds {where}.vocab_size={value['vocab_size']}")
    t = value["temperature"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise fail(f"{where}.temperature must be a number > 0, got {t!r}")
    return StoreMeta(
        teacher=value["teacher"],
        k=value["k"],
        temperature=float(t),
        vocab_size=value["vocab_size"],
        tokenizer_hash=value["tokenizer_hash"],
    )


def _validate_manifest(folder: Path, manifest) -> dict:
    """The one schema check of a manifest (parsed JSON): every field, its type, file names, no id
    twice, and ``complete`` agreeing with the ids. Returns it with ``meta`` as a ``StoreMeta``."""

    def fail(problem: str) -> StoreError:
        return StoreError(f"pseudo-label store {folder}: {MANIFEST}: {problem}; restore it or {_REBUILD}")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"pseudo-label store {folder}: {MANIFEST} is not a {FORMAT} manifest")
    version = manifest.get("version")
    if not (_is_int(version, 0) and version == VERSION):
        raise StoreError(
            f"pseudo-label store {folder}: format version {version!r} is not supported (this clinkd "
            f"reads version {VERSION}); {_REBUILD}"
        )
    _object(manifest, ("format", "version", "meta", "dataset", "complete", "shards"), "the manifest", fail)
    meta = _meta_from(manifest["meta"], "meta", fail)
    dataset = _object(manifest["dataset"], ("num_samples", "ids_sha256"), "dataset", fail)
    if not _is_int(dataset["num_samples"], 0):
        raise fail(f"dataset.num_samples must be an int >= 0, got {dataset['num_samples']!r}")
    if not isinstance(dataset["ids_sha256"], str) or not _SHA256.fullmatch(dataset["ids_sha256"]):
        raise fail(f"dataset.ids_sha256 must be a sha256 (64 lowercase hex digits), got {dataset['ids_sha256']!r}")
    if not isinstance(manifest["complete"], bool):
        raise fail(f"complete must be true or false, got {manifest['complete']!r}")
    if not isinstance(manifest["shards"], list):
        raise fail(f"shards must be a list, got {type(manifest['shards']).__name__}")
    shards, ids, seen = [], [], set()
    for s, entry in enumerate(manifest["shards"]):
        where = f"shards[{s}]"
        entry = _object(entry, ("file", "bytes", "sha256", "rows", "samples"), where, fail)
        if entry["file"] != _shard_name(s):
            raise fail(f"{where}.file must be {_shard_name(s)!r}, got {entry['file']!r}")
        if not _is_int(entry["bytes"], 8):
            raise fail(f"{where}.bytes must be an int >= 8, got {entry['bytes']!r}")
        if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
            raise fail(f"{where}.sha256 must be a sha256 (64 lowercase hex digits), got {entry['sha256']!r}")
        if not _is_int(entry["rows"], 0):
            raise fail(f"{where}.rows must be an int >= 0, got {entry['rows']!r}")
        samples = entry["samples"]
        if not isinstance(samples, list) or not samples or not all(isinstance(sid, str) for sid in samples):
            raise fail(f"{where}.samples must be a non-empty list of str")
        for sid in samples:
            if sid in seen:
                raise fail(f"sample {sid!r} is listed twice ({where})")
            seen.add(sid)
        ids.extend(samples)
        shards.append(dict(entry, samples=list(samples)))
    n = dataset["num_samples"]
    whole = len(ids) == n and ids_hash(ids) == dataset["ids_sha256"]
    if len(ids) > n:
        raise fail(f"its shards list {len(ids)} samples, the data set has {n}")
    if len(ids) == n and not whole:
        raise fail(f"its shards list {n} samples that are not the data set (other ids, or another order)")
    if manifest["complete"] and not whole:
        raise fail(f"it says it is complete, but its shards hold {len(ids)} of {n} samples")
    if whole and not manifest["complete"]:
        raise fail("it says it is incomplete, but its shards hold the whole data set")
    return {
        "format": FORMAT,
        "version": VERSION,
        "meta": meta,
        "dataset": {"num_samples": n, "ids_sha256": dataset["ids_sha256"]},
        "complete": manifest["complete"],
        "shards": shards,
    }


def check_folder(folder: Path, *, write: bool) -> None:
    """StoreError naming ``folder`` when it cannot hold a store: a path that is a file (or anything but a
    folder), a symbolic link to nothing, or a folder this process may not read (``write``: or write).
    The writer creates a missing folder (an error there says why it could not); the reader's missing
    folder is reported by its manifest check."""
    where = f"pseudo-label store {folder}"
    if folder.is_symlink() and not folder.exists():
        raise StoreError(f"{where}: the path is a symbolic link to {os.readlink(folder)}, which does not exist")
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"{where}: the path is a file, not a folder; give a folder (new or a store's)")
    if write and not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{where}: the folder cannot be created ({e.strerror or e})") from None
    if not folder.exists():
        return
    need, what = (os.R_OK | os.W_OK | os.X_OK, "read and write") if write else (os.R_OK | os.X_OK, "read")
    if not os.access(folder, need):
        raise StoreError(f"{where}: no permission to {what} the folder (check its owner and mode)")


def read_manifest(folder: Path) -> dict | None:
    """The validated manifest of the store at ``folder`` (``meta`` a ``StoreMeta``), None if it has none."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise StoreError(f"pseudo-label store {folder}: {MANIFEST} is unreadable ({e})") from None
    return _validate_manifest(Path(folder), manifest)


def check_meta(folder: Path, stored: StoreMeta, expected: StoreMeta) -> None:
    """StoreError, listing every field that differs, when the store at ``folder`` (its metadata ``stored``)
    was written for other settings than ``expected``."""
    problems = stored.mismatches(expected)
    if problems:
        raise StoreError(
            f"pseudo-label store {folder} was written for another run:\n  "
            + "\n  ".join(problems)
            + "\nrebuild it (clinkd distill cache) or use another store folder"
        )


# ------------------------------------------------------------------ shards


def _shard_metadata(s: int, samples: list[str], rows: int, meta: StoreMeta, dataset: dict) -> dict[str, str]:
    """The safetensors metadata of shard s: written by the writer, and what a reader expects to find."""
    return {
        "format": FORMAT,
        "version": str(VERSION),
        "shard": str(s),
        "rows": str(rows),
        "samples": json.dumps(samples),
        "meta": json.dumps(asdict(meta), sort_keys=True),
        "dataset": json.dumps(dataset, sort_keys=True),
    }


def _tensor_specs(n: int, rows: int, k: int) -> dict[str, tuple[str, list[int]]]:
    shapes = {
        "indices": [rows, k],
        "logprobs": [rows, k],
        "offsets": [n + 1],
        **{name: [rows] for name in ("lse", "margin", "residual", "targets")},
    }
    return {name: (_DTYPES[name][0], shape) for name, shape in shapes.items()}


def _parse_header(raw: bytes) -> dict:
    """The JSON header of a safetensors file from its first bytes; ValueError if it is not one."""
    if len(raw) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise ValueError(f"its header claims {n} bytes, past the end of the file")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header


def _check_header(folder: Path, s: int, entry: dict, meta: StoreMeta, dataset: dict, header: dict) -> None:
    """Shard s's header carries exactly what the manifest says of it: index, ids, rows, meta, data set,
    and tensors of the expected names, dtypes and shapes."""
    name = entry["file"]
    found = header.get("__metadata__")
    found = found if isinstance(found, dict) else {}
    expected = _shard_metadata(s, entry["samples"], entry["rows"], meta, dataset)
    differ = sorted(key for key in expected.keys() | found.keys() if found.get(key) != expected.get(key))
    if differ:
        raise StoreError(
            f"pseudo-label store {folder}: shard {name} does not belong there: its {', '.join(differ)} "
            "differ from what the manifest says of it (a shard swapped, replaced or written by something "
            f"else, or an edited manifest); {_REBUILD}"
        )
    specs = _tensor_specs(len(entry["samples"]), entry["rows"], meta.k)
    tensors = {key: value for key, value in header.items() if key != "__metadata__"}
    missing, extra = sorted(specs.keys() - tensors.keys()), sorted(tensors.keys() - specs.keys())
    problems = [f"missing {', '.join(missing)}"] * bool(missing) + [f"unexpected {', '.join(extra)}"] * bool(extra)
    for key in sorted(specs.keys() & tensors.keys()):
        info = tensors[key] if isinstance(tensors[key], dict) else {}
        dtype, shape = info.get("dtype"), info.get("shape")
        if (dtype, shape) != specs[key]:
            problems.append(f"{key} is {dtype} {shape}, expected {specs[key][0]} {specs[key][1]}")
    if problems:
        raise StoreError(
            f"pseudo-label store {folder}: shard {name}: tensors differ from a shard's: "
            f"{'; '.join(problems)}; {_REBUILD}"
        )


def _row_problems(fields: dict, k: int, vocab_size: int) -> list[str]:
    """What is wrong with rows (one sample's, or a shard's): kinds, one R, values; [] when nothing."""
    out = [f"{name} is not a tensor" for name in _ROWS if not isinstance(fields[name], torch.Tensor)]
    if out:
        return out
    for name in _ROWS:
        dtype = fields[name].dtype
        integer = not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
        if name in _INTEGER and not integer:
            out.append(f"{name} must be an integer tensor, got {dtype}")
        elif name not in _INTEGER and not dtype.is_floating_point:
            out.append(f"{name} must be a floating-point tensor, got {dtype}")
    shapes = {name: list(fields[name].shape) for name in _ROWS}
    rows = shapes["targets"][0] if len(shapes["targets"]) == 1 else -1
    want = {name: [rows, k] if name in ("indices", "logprobs") else [rows] for name in _ROWS}
    if any(shapes[name] != want[name] for name in _ROWS):
        out.append(
            f"fields must be indices [R, k={k}], logprobs [R, k], lse/margin/residual/targets [R] with one R; "
            "got " + ", ".join(f"{name} {shapes[name]}" for name in _ROWS)
        )
    if out:
        return out
    for name in _INTEGER:
        t = fields[name]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
            out.append(f"{name} must be in [0, {vocab_size}), got values in [{int(t.min())}, {int(t.max())}]")
    for name in _FIELDS[1:]:  # -inf log-probs and +inf lse are valid (rows with +inf logits); NaN never is
        bad = torch.isnan(fields[name])
        if name == "lse":
            bad |= torch.isneginf(fields[name])
        if bool(bad.any()):
            out.append(f"{name} holds NaN" + (" or -inf" if name == "lse" else ""))
    return out


def _check_listed(folder: Path, manifest: dict) -> None:
    """Every shard the manifest lists exists with its size and a header that binds it to its place."""
    for s, entry in enumerate(manifest["shards"]):
        path = folder / entry["file"]
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) == 8 and int.from_bytes(raw, "little") <= size - 8:
                    raw += f.read(int.from_bytes(raw, "little"))
        except FileNotFoundError:
            size = None
        except OSError as e:
            raise StoreError(f"pseudo-label store {folder}: shard {entry['file']} is unreadable ({e})") from None
        if size != entry["bytes"]:
            raise StoreError(
                f"pseudo-label store {folder}: shard {entry['file']} is "
                f"{'missing' if size is None else f'{size} bytes'}, the manifest says "
                f"{entry['bytes']} bytes (truncated or replaced); {_REBUILD}"
            )
        try:
            header = _parse_header(raw)
        except ValueError as e:
            raise StoreError(
                f"pseudo-label store {folder}: shard {entry['file']} is not a safetensors file ({e}); {_REBUILD}"
            ) from None
        _check_header(folder, s, entry, manifest["meta"], manifest["dataset"], header)


# ------------------------------------------------------------------ writer


class PseudoLabelWriter:
    """Appends samples' pseudo-labels to a store, resuming a store left by an interrupted run.

    ids: every sample id of the data set, in order; samples are added in that order (the store is
    complete when all are committed); shard_size: samples per shard. An existing store must have the
    same metadata and data set; a new store's manifest is written at once.
    """

    def __init__(self, path: str | os.PathLike, meta: StoreMeta, ids: list[str], *, shard_size: int = 256):
        if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
            raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
        ids = list(ids)
        if not all(isinstance(sid, str) for sid in ids):
            raise ValueError("sample ids must be str")
        if len(set(ids)) != len(ids):
            raise ValueError("sample ids must be unique")
        self.folder = Path(path)
        check_folder(self.folder, write=True)
        self.meta = _meta_from(asdict(meta), "meta", ValueError)
        self.ids, self.shard_size = ids, shard_size
        self._position = {sid: i for i, sid in enumerate(ids)}
        dataset = {"num_samples": len(ids), "ids_sha256": ids_hash(ids)}
        manifest = read_manifest(self.folder)
        if manifest is None:
            orphans = sorted(p.name for p in self.folder.iterdir() if _SHARD_FILE.fullmatch(p.name))
            if orphans:
                listed = ", ".join(orphans[:10]) + (f" and {len(orphans) - 10} more" if len(orphans) > 10 else "")
                raise StoreError(
                    f"pseudo-label store {self.folder} holds {listed} but no {MANIFEST}: "
                    f"it was removed, so these shards cannot be checked or resumed. Restore {MANIFEST}, "
                    "or delete these files (or the folder) to rebuild the store"
                )
            self.manifest = {
                "format": FORMAT,
                "version": VERSION,
                "meta": self.meta,
                "dataset": dataset,
                "complete": not ids,
                "shards": [],
            }
        else:
            check_meta(self.folder, manifest["meta"], self.meta)
            if manifest["dataset"] != dataset:
                raise StoreError(
                    f"pseudo-label store {self.folder} was written for another data set "
                    f"({manifest['dataset']['num_samples']} samples; this run has {len(ids)} with "
                    "other ids)"
                )
            committed = [sid for shard in manifest["shards"] for sid in shard["samples"]]
            if committed != ids[: len(committed)]:
                raise StoreError(
                    f"pseudo-label store {self.folder}: its shards do not hold the first "
                    f"{len(committed)} samples of the data set in order; {_REBUILD}"
                )
            _check_listed(self.folder, manifest)
            self.manifest, self.meta = manifest, manifest["meta"]  # new shards carry the stored metadata
        self.committed = [sid for shard in self.manifest["shards"] for sid in shard["samples"]]
        self.done = set(self.committed)
        self._discard_uncommitted()
        if manifest is None:
            self._write_manifest()
        self._buffer: list[tuple[str, dict[str, torch.Tensor]]] = []

    def _discard_uncommitted(self) -> None:
        listed = {shard["file"] for shard in self.manifest["shards"]}
        for entry in self.folder.iterdir():
            stray = entry.name.startswith(".tmp-") or (_SHARD_FILE.fullmatch(entry.name) and entry.name not in listed)
            if stray and entry.is_file():
                entry.unlink()

    @property
    def pending(self) -> list[str]:
        """Ids not committed yet, in data-set order."""
        return self.ids[len(self.committed) :]

    def add(self, sample_id: str, labels: PseudoLabels, targets: torch.Tensor) -> None:
        """Buffer the next sample's rows (PseudoLabels [R, k], targets [R]); a full buffer becomes a shard."""
        if not isinstance(sample_id, str) or sample_id not in self._position:
            raise ValueError(f"sample {sample_id!r} is not in this store's data set")
        following = len(self.committed) + len(self._buffer)  # committed and buffered: a prefix of the data set
        if self._position[sample_id] < following:
            raise ValueError(f"sample {sample_id!r} is already in the store")
        if self._position[sample_id] > following:
            raise ValueError(
                f"sample {sample_id!r} is out of order: samples are added in data-set order, "
                f"the next is {self.ids[following]!r}"
            )
        if not isinstance(labels, tuple) or len(labels) != len(_FIELDS):
            raise ValueError(f"pseudo-labels of {sample_id!r} must be a PseudoLabels ({', '.join(_FIELDS)})")
        fields = dict(zip(_FIELDS, labels), targets=targets)
        # On the host, where the shard is written from: the value checks then cost no device syncs.
        fields = {name: t.detach().to("cpu") if isinstance(t, torch.Tensor) else t for name, t in fields.items()}
        problems = _row_problems(fields, self.meta.k, self.meta.vocab_size)
        if problems:
            raise ValueError(f"pseudo-labels of {sample_id!r}: " + "; ".join(problems))
        rows = {name: t.to(_DTYPES[name][1], copy=True) for name, t in fields.items()}
        self._buffer.append((sample_id, rows))
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered samples as one shard, then the manifest that lists it."""
        if not self._buffer:
            return
        from safetensors.torch import save

        samples = [sid for sid, _ in self._buffer]
        tensors = {name: torch.cat([rows[name] for _, rows in self._buffer]).contiguous() for name in _ROWS}
        counts = [rows["targets"].shape[0] for _, rows in self._buffer]
        tensors["offsets"] = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)
        s, n_rows = len(self.manifest["shards"]), int(sum(counts))
        data = save(tensors, metadata=_shard_metadata(s, samples, n_rows, self.meta, self.manifest["dataset"]))
        write_bytes_atomic(self.folder / _shard_name(s), data)
        self.manifest["shards"].append(
            {
                "file": _shard_name(s),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "rows": n_rows,
                "samples": samples,
            }
        )
        self.committed.extend(samples)
        self.done.update(samples)
        self._buffer = []
        self._write_manifest()

    def _write_manifest(self) -> None:
        self.manifest["complete"] = self.committed == self.ids
        manifest = dict(self.manifest, meta=asdict(self.manifest["meta"]))
        write_bytes_atomic(self.folder / MANIFEST, json.dumps(manifest, indent=1).encode())

    def close(self) -> bool:
        """Flush what is buffered; returns whether every sample of the data set is committed."""
        self.flush()
        return self.committed == self.ids


# ------------------------------------------------------------------ reader


class PseudoLabelStore:
    """Read access to a complete store (or, with ``allow_incomplete``, its committed part). Opening
    checks the manifest and every shard's size and header; a shard's sha256 and tensors are verified
    when it is loaded; ``verify_all()`` loads every shard. Loaded shards are kept in an LRU of
    ``cache_shards``."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        expect: StoreMeta | None = None,
        cache_shards: int = 64,
        allow_incomplete: bool = False,
    ):
        self.folder = Path(path)
        check_folder(self.folder, write=False)
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise StoreError(
                f"no pseudo-label store at {self.folder} ({MANIFEST} missing); build it with clinkd distill cache"
            )
        if expect is not None:
            check_meta(self.folder, manifest["meta"], expect)
        if not manifest["complete"] and not allow_incomplete:
            n = sum(len(s["samples"]) for s in manifest["shards"])
            raise StoreError(
                f"pseudo-label store {self.folder} is incomplete ({n} of "
                f"{manifest['dataset']['num_samples']} samples); resume it with clinkd distill cache"
            )
        _check_listed(self.folder, manifest)
        self.manifest, self.meta = manifest, manifest["meta"]
        self._where = {
            sid: (s, j) for s, shard in enumerate(manifest["shards"]) for j, sid in enumerate(shard["samples"])
        }
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self.cache_shards = cache_shards

    @property
    def ids(self) -> list[str]:
        return [sid for shard in self.manifest["shards"] for sid in shard["samples"]]

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._where

    def _shard(self, s: int) -> dict:
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        from safetensors.torch import load

        shard = self.manifest["shards"][s]
        where = f"pseudo-label store {self.folder}: shard {shard['file']}"
        try:
            data = (self.folder / shard["file"]).read_bytes()
        except OSError as e:
            raise StoreError(f"{where} is unreadable ({e}); {_REBUILD}") from None
        if len(data) != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise StoreError(f"{where} fails its checksum (altered or truncated); {_REBUILD}")
        try:
            header = _parse_header(data)
            tensors = load(data)
        except Exception as e:  # a shard with a valid checksum that is no safetensors file: written by something else
            raise StoreError(f"{where} is unreadable ({e}); {_REBUILD}") from None
        _check_header(self.folder, s, shard, self.meta, self.manifest["dataset"], header)
        specs = _tensor_specs(len(shard["samples"]), shard["rows"], self.meta.k)
        problems = [
            f"{name} is {tensors[name].dtype} {list(tensors[name].shape)}"
            for name, (_, shape) in specs.items()
            if tensors[name].dtype != _DTYPES[name][1] or list(tensors[name].shape) != shape
        ]
        if not problems:
            problems = _row_problems(tensors, self.meta.k, self.meta.vocab_size)
            offsets = tensors["offsets"]
            if int(offsets[0]) != 0:
                problems.append("offsets must start at 0")
            if bool((offsets[1:] < offsets[:-1]).any()):
                problems.append("offsets must be non-decreasing")
            if int(offsets[-1]) != shard["rows"]:
                problems.append(f"offsets must end at the row count {shard['rows']}, got {int(offsets[-1])}")
        if problems:
            raise StoreError(f"{where}: {'; '.join(problems)}; {_REBUILD}")
        self._cache[s] = tensors
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return tensors

    def verify_all(self) -> None:
        """Load (and so checksum and check) every shard; StoreError on the first bad one."""
        for s in range(len(self.manifest["shards"])):
            self._shard(s)
            self._cache.pop(s, None)

    def get(self, sample_id: str) -> tuple[PseudoLabels, torch.Tensor]:
        """(PseudoLabels [R, k], targets int32 [R]) of one sample."""
        if sample_id not in self._where:
            raise StoreError(f"pseudo-label store {self.folder} has no sample {sample_id!r}")
        s, j = self._where[sample_id]
        tensors = self._shard(s)
        a, b = int(tensors["offsets"][j]), int(tensors["offsets"][j + 1])
        return PseudoLabels(*(tensors[name][a:b] for name in _FIELDS)), tensors["targets"][a:b]

    def batch(self, sample_ids: list[str]) -> tuple[PseudoLabels, torch.Tensor]:
        """The rows of several samples concatenated in the given order (the order of a batch's rows)."""
        parts = [self.get(sid) for sid in sample_ids]
        labels = PseudoLabels(*(torch.cat([getattr(p, name) for p, _ in parts]) for name in _FIELDS))
        return labels, torch.cat([t for _, t in parts])
