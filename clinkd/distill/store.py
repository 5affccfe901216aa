"""The pseudo-label store: a teacher's top-k pseudo-labels per sample, on disk, checked on every read.

Layout of a store folder:

    manifest.json                 written last, atomically: what is committed
    shard-00000.safetensors       the rows of a run of samples (one file per ``shard_size`` samples)
    ...

A shard holds, for its samples in manifest order, one row per supervised next-token position (the
rows ``next_token_targets`` keeps, in sequence order), concatenated:

    indices  int32 [R, k]   logprobs fp32 [R, k]   lse fp32 [R]   margin fp32 [R]   residual fp32 [R]
    targets  int32 [R]      the token each row predicts (checked against the student's batch)
    offsets  int64 [n + 1]  sample j owns rows offsets[j]:offsets[j+1]

The manifest records the metadata a reader must agree with (teacher id, k, temperature, vocabulary
size, tokenizer fingerprint), the data set (sample count and a hash of the ids in order), and per shard
its file name, byte size, sha256 and sample ids. Writes go to a temporary file that is fsynced and
renamed, and the manifest is replaced only after its shard is in place: a run killed at any point
leaves the last manifest, which names only whole, checksummed shards. Resuming skips the samples
that manifest lists; files it does not list (a shard renamed before its manifest) are discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from clinkd.io import write_bytes_atomic
from clinkd_kernels.topk import PseudoLabels

FORMAT = "clinkd-pseudo-labels"
VERSION = 1
MANIFEST = "manifest.json"
_FIELDS = PseudoLabels._fields  # ("indices", "logprobs", "lse", "margin", "residual")


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

    def mismatches(self, other: "StoreMeta") -> list[str]:
        out = []
        for name, mine in asdict(self).items():
            theirs = getattr(other, name)
            same = abs(mine - theirs) <= 1e-9 * max(1.0, abs(mine)) if name == "temperature" else mine == theirs
            if not same:
                out.append(f"{name}: store has {mine!r}, this run has {theirs!r}")
        return out


def ids_hash(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"pseudo-label store {folder}: {MANIFEST} is unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"pseudo-label store {folder}: {MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise StoreError(f"pseudo-label store {folder}: format version {manifest.get('version')} is not supported "
                         f"(this clinkd reads version {VERSION})")
    try:
        manifest["meta"] = StoreMeta(**manifest["meta"])
    except (KeyError, TypeError) as e:
        raise StoreError(f"pseudo-label store {folder}: {MANIFEST} has malformed metadata ({e})") from None
    return manifest


def _check_meta(folder: Path, stored: StoreMeta, expected: StoreMeta) -> None:
    problems = stored.mismatches(expected)
    if problems:
        raise StoreError(f"pseudo-label store {folder} was written for another run:\n  " + "\n  ".join(problems)
                         + "\nrebuild it (clinkd distill cache) or use another store folder")


class PseudoLabelWriter:
    """Appends samples' pseudo-labels to a store, resuming a store left by an interrupted run.

    ids: every sample id of the data set, in order (the store is complete when all are committed);
    shard_size: samples per shard. An existing store must have the same metadata and data set.
    """

    def __init__(self, path: str | os.PathLike, meta: StoreMeta, ids: list[str], *, shard_size: int = 256):
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
        if len(set(ids)) != len(ids):
            raise ValueError("sample ids must be unique")
        self.folder = Path(path)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.meta, self.ids, self.shard_size = meta, list(ids), shard_size
        manifest = _read_manifest(self.folder)
        if manifest is None:
            manifest = {"format": FORMAT, "version": VERSION, "meta": meta,
                        "dataset": {"num_samples": len(self.ids), "ids_sha256": ids_hash(self.ids)},
                        "complete": False, "shards": []}
        else:
            _check_meta(self.folder, manifest["meta"], meta)
            dataset = manifest.get("dataset", {})
            if dataset.get("ids_sha256") != ids_hash(self.ids):
                raise StoreError(f"pseudo-label store {self.folder} was written for another data set "
                                 f"({dataset.get('num_samples')} samples; this run has {len(self.ids)} with other ids)")
        self.manifest = manifest
        self.done = {sid for shard in manifest["shards"] for sid in shard["samples"]}
        self._discard_uncommitted()
        self._buffer: list[tuple[str, PseudoLabels, torch.Tensor]] = []

    def _discard_uncommitted(self) -> None:
        listed = {shard["file"] for shard in self.manifest["shards"]} | {MANIFEST}
        for entry in self.folder.iterdir():
            if entry.name not in listed and (entry.name.startswith(".tmp-") or entry.name.startswith("shard-")):
                entry.unlink()

    @property
    def pending(self) -> list[str]:
        """Ids not committed yet, in data-set order."""
        return [sid for sid in self.ids if sid not in self.done]

    def add(self, sample_id: str, labels: PseudoLabels, targets: torch.Tensor) -> None:
        """Buffer one sample's rows (PseudoLabels [R, k], targets [R]); a full buffer becomes a shard."""
        if sample_id in self.done or any(sample_id == s for s, _, _ in self._buffer):
            raise ValueError(f"sample {sample_id!r} is already in the store")
        if labels.indices.dim() != 2 or labels.indices.shape[1] != self.meta.k:
            raise ValueError(f"pseudo-labels of {sample_id!r} must be [R, k={self.meta.k}], "
                             f"got indices {list(labels.indices.shape)}")
        if targets.shape != labels.lse.shape:
            raise ValueError(f"targets of {sample_id!r} must be [R={labels.lse.shape[0]}], got {list(targets.shape)}")
        self._buffer.append((sample_id, labels, targets))
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered samples as one shard, then the manifest that lists it."""
        if not self._buffer:
            return
        from safetensors.torch import save

        counts = [t.shape[0] for _, _, t in self._buffer]
        tensors = {name: torch.cat([getattr(pl, name).detach().cpu() for _, pl, _ in self._buffer]).contiguous()
                   for name in _FIELDS}
        tensors["indices"] = tensors["indices"].to(torch.int32)
        for name in _FIELDS[1:]:
            tensors[name] = tensors[name].float()
        tensors["targets"] = torch.cat([t.detach().cpu().to(torch.int32) for _, _, t in self._buffer])
        tensors["offsets"] = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)
        data = save(tensors, metadata={"format": FORMAT})
        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        write_bytes_atomic(self.folder / name, data)
        shard = {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                 "rows": int(sum(counts)), "samples": [sid for sid, _, _ in self._buffer]}
        self.manifest["shards"].append(shard)
        self.done.update(shard["samples"])
        self._buffer = []
        self.manifest["complete"] = len(self.done) == len(self.ids)
        self._write_manifest()

    def _write_manifest(self) -> None:
        manifest = dict(self.manifest, meta=asdict(self.manifest["meta"]))
        write_bytes_atomic(self.folder / MANIFEST, json.dumps(manifest, indent=1).encode())

    def close(self) -> bool:
        """Flush what is buffered; returns whether every sample is committed."""
        self.flush()
        if not self.manifest["shards"] and not self.ids:
            self._write_manifest()
        return len(self.done) == len(self.ids)


class PseudoLabelStore:
    """Read access to a complete store. Every shard's sha256 and size are verified when it is loaded;
    ``verify_all()`` checks every shard at once. Loaded shards are kept in an LRU of ``cache_shards``."""

    def __init__(self, path: str | os.PathLike, *, expect: StoreMeta | None = None, cache_shards: int = 64,
                 allow_incomplete: bool = False):
        self.folder = Path(path)
        manifest = _read_manifest(self.folder)
        if manifest is None:
            raise StoreError(f"no pseudo-label store at {self.folder} ({MANIFEST} missing); build it with "
                             "clinkd distill cache")
        if expect is not None:
            _check_meta(self.folder, manifest["meta"], expect)
        if not manifest.get("complete") and not allow_incomplete:
            n = sum(len(s["samples"]) for s in manifest["shards"])
            raise StoreError(f"pseudo-label store {self.folder} is incomplete ({n} of "
                             f"{manifest['dataset']['num_samples']} samples); resume it with clinkd distill cache")
        self.manifest, self.meta = manifest, manifest["meta"]
        self._where: dict[str, tuple[int, int]] = {}
        for s, shard in enumerate(manifest["shards"]):
            path = self.folder / shard["file"]
            size = path.stat().st_size if path.exists() else None
            if size != shard["bytes"]:
                raise StoreError(f"pseudo-label store {self.folder}: shard {shard['file']} is "
                                 f"{'missing' if size is None else f'{size} bytes'}, the manifest says "
                                 f"{shard['bytes']} bytes (truncated or replaced)")
            for j, sid in enumerate(shard["samples"]):
                if sid in self._where:
                    raise StoreError(f"pseudo-label store {self.folder}: sample {sid!r} appears twice")
                self._where[sid] = (s, j)
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
        data = (self.folder / shard["file"]).read_bytes()
        if len(data) != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise StoreError(f"pseudo-label store {self.folder}: shard {shard['file']} fails its checksum "
                             "(altered or truncated); rebuild the store")
        try:
            tensors = load(data)
        except Exception as e:  # a shard with a valid checksum that safetensors rejects: written by something else
            raise StoreError(f"pseudo-label store {self.folder}: shard {shard['file']} is unreadable ({e})") from None
        offsets = tensors["offsets"]
        if offsets.numel() != len(shard["samples"]) + 1 or int(offsets[-1]) != tensors["targets"].shape[0]:
            raise StoreError(f"pseudo-label store {self.folder}: shard {shard['file']} has inconsistent offsets")
        self._cache[s] = tensors
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return tensors

    def verify_all(self) -> None:
        """Load (and so checksum) every shard; StoreError on the first bad one."""
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
