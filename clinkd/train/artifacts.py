"""What a run writes beside its models, and reads back on resume:

output_dir/processor/         the offline processor (``build_processor``), with clinkd_offline.json: the
                              options it was built with (``check_saved_options``)
the pseudo-label store        of a kd stage with teacher: store (``ensure_store``; its metadata
                              ``store_meta``, an existing one checked by ``check_existing_store``)
<stage>/stage.json            a complete stage's result (``write_result`` / ``read_result``; a round's
                              round.json likewise)
<final>/clinkd_patch.json     the patch a model was trained with (``write_patch_record``)
<final>/model.safetensors     in the hub layout (``hub_renamings``: what ``ClinKDTrainer.save_model`` writes with)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from clinkd.io import write_bytes_atomic
from clinkd.patch import record as patch_record

from ..data.offline_processor import build_offline_processor, load_processor, special_token_ids, tokenizer_fingerprint
from ..data.records import Record, load_records
from ..distill.store import PseudoLabelStore, StoreMeta, check_meta, read_manifest
from .errors import ConfigError
from .models import vocab_size
from .specs import KDStage, RunConfig

OFFLINE_RECORD = "clinkd_offline.json"  # beside a saved offline processor: the options it was built with
STAGE_RECORD = "stage.json"  # in a stage's folder once the stage is complete


# ------------------------------------------------------------------ the processor


def build_processor(config: RunConfig, records: list[Record] | None = None):
    """The run's processor: offline (built from the training texts, saved under output_dir and reused,
    as long as it was built with the same options) or loaded. ConfigError naming ``config.processor``
    for options the builder refuses, a processor that does not load, or one that is not Qwen2-VL's.
    ``records``: the loaded training records (read from ``config.data`` when not given)."""
    spec = config.processor
    if "offline" in spec:
        processor = _offline_processor(config, dict(spec["offline"] or {}), records)
        where = "config.processor.offline"
    else:
        path = spec.get("from_pretrained") or config.student.from_pretrained
        where = (
            "config.processor.from_pretrained"
            if spec.get("from_pretrained")
            else "config.models.student.from_pretrained (the processor's default)"
        )
        try:
            processor = load_processor(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the processor from {path!r}: {e}") from None
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise ConfigError(
            f"{where}: {type(processor).__name__} is not an image-and-text processor (it needs a "
            "tokenizer and an image processor)"
        )
    try:
        special_token_ids(processor.tokenizer)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return processor


def _offline_processor(config: RunConfig, options: dict, records: list[Record] | None):
    """The offline processor saved in output_dir/processor (built with ``options``), or built and saved."""
    saved = Path(config.output_dir) / "processor"
    if (saved / "processor_config.json").is_file():
        check_saved_options(saved, options)
        return load_processor(str(saved))
    if records is None:
        records = load_records(config.data.train, root=config.data.root, check_images=False)
    texts = [text for r in records for pair in r.turns for text in pair]
    try:
        processor = build_offline_processor(texts, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.processor.offline: {e}") from None
    # Saved whole or not at all: into a fresh folder beside it, then renamed into place (a killed run
    # never leaves a processor_config.json next to a half-written tokenizer).
    saved.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=saved.parent, prefix=".processor-"))
    try:
        processor.save_pretrained(str(staging))
        (staging / OFFLINE_RECORD).write_text(json.dumps({"offline": options}, sort_keys=True))
        if saved.exists():
            shutil.rmtree(saved)  # left by an interrupted save (it has no processor_config.json)
        os.replace(staging, saved)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # no half-written staging folder is left behind
        raise
    return processor


def check_saved_options(saved: Path, options: dict) -> None:
    """A processor saved by an earlier run is reused only when it was built with these options (a
    processor saved before the options were recorded is reused as it is)."""
    record = saved / OFFLINE_RECORD
    if not record.is_file():
        return
    try:
        before = json.loads(record.read_text(encoding="utf-8"))["offline"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{record} is unreadable, so the processor saved in {saved} cannot be matched to "
            f"config.processor.offline; delete {saved} to rebuild it"
        ) from None
    if before != options:
        raise ConfigError(
            f"config.processor.offline {options} differs from the options {before} the processor "
            f"saved in {saved} was built with; restore them, or use another output_dir (or delete "
            f"{saved} to rebuild it)"
        )


# ------------------------------------------------------------------ pseudo-label stores


def store_meta(config: RunConfig, stage: KDStage, processor, student_vocab: int) -> StoreMeta:
    """The metadata the store of ``stage`` must have for this run."""
    return StoreMeta(
        teacher=config.teacher.model_id(),
        k=int(stage.topk),
        temperature=float(stage.temperature),
        vocab_size=student_vocab,
        tokenizer_hash=tokenizer_fingerprint(processor.tokenizer),
    )


def check_existing_store(config: RunConfig, stage: KDStage, meta: StoreMeta) -> None:
    """A store already at the stage's place was written for ``meta`` (StoreError otherwise)."""
    path = config.store_path(stage)
    manifest = read_manifest(path) if path.exists() else None
    if manifest is not None:
        check_meta(path, manifest["meta"], meta)


def ensure_store(prepared, stage: KDStage, teacher_factory, *, progress: bool = True) -> PseudoLabelStore:
    """The complete store of a kd stage: built (or resumed) with ``teacher_factory()`` when needed, then
    opened with its metadata checked against this run. ``prepared``: the run's ``PreparedRun``."""
    from ..distill.cache import cache_pseudo_labels

    config = prepared.config
    meta = store_meta(config, stage, prepared.processor, vocab_size(prepared.model_configs["student"]))
    path = config.store_path(stage)
    manifest = read_manifest(path) if path.exists() else None
    if manifest is None or not manifest.get("complete"):
        cache_pseudo_labels(
            teacher_factory(),
            prepared.dataset,
            prepared.collator,
            path,
            meta=meta,
            batch_size=stage.cache_batch_size,
            shard_size=stage.shard_size,
            progress=progress,
        )
    return PseudoLabelStore(path, expect=meta)


# ------------------------------------------------------------------ results and patch records


def write_result(path: str | os.PathLike, result: dict) -> None:
    """A complete stage's (or round's) result, as JSON, written atomically."""
    write_bytes_atomic(Path(path), json.dumps(result, indent=1).encode())


def read_result(path: str | os.PathLike) -> dict | None:
    """The result ``write_result`` wrote at ``path``; None when there is none (the stage is not complete)."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_patch_record(folder: str | os.PathLike, patch: Mapping | None) -> None:
    """Record beside saved weights the patch they were trained with: a ``PatchSpec`` (or a mapping of
    ``patch_qwen2_vl`` keywords), None for an unpatched model."""
    patch_record.write_patch_record(folder, None if patch is None else dict(patch))


# ------------------------------------------------------------------ the saved model's layout


def hub_renamings(model) -> list | None:
    """The weight renamings transformers saves ``model`` with when it was built from its config (the
    hub layout of its class), or None where this transformers release has none. Read from the model
    before an engine wraps it, and without the prefix changes a load may have recorded."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return None
    try:
        from transformers.core_model_loading import PrefixChange
    except ImportError:  # releases without prefix changes
        PrefixChange = ()
    renamings = [r for r in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(r, PrefixChange)]
    return renamings or None


__all__ = [
    "OFFLINE_RECORD",
    "STAGE_RECORD",
    "build_processor",
    "check_existing_store",
    "check_saved_options",
    "ensure_store",
    "hub_renamings",
    "read_result",
    "store_meta",
    "write_patch_record",
    "write_result",
]
