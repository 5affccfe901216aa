"""The TrainingArguments keywords of a run config (``training`` and ``stages[].training``), checked.

Known names only (the fields of the installed transformers' TrainingArguments), none of the ones clinkd
sets itself, and every numeric or boolean value of the type TrainingArguments declares for it (pydantic,
strict), in the range of ``TRAINING_RANGES``. The other values (strings, enums, mappings)
TrainingArguments converts and checks itself when it is built (``clinkd.train.checks``).
"""

from __future__ import annotations

import functools
from typing import Annotated

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from .errors import ConfigError
from .schema import phrase

FORCED_ARGS = ("output_dir", "remove_unused_columns", "label_names", "resume_from_checkpoint")

# Values transformers accepts but training then fails on, or silently misreads.
TRAINING_RANGES = {
    "learning_rate": Field(ge=0),
    "weight_decay": Field(ge=0),
    "adam_beta1": Field(ge=0, lt=1),
    "adam_beta2": Field(ge=0, lt=1),
    "adam_epsilon": Field(ge=0),
    "max_grad_norm": Field(ge=0),
    "num_train_epochs": Field(gt=0),
    "per_device_train_batch_size": Field(ge=1),
    "per_device_eval_batch_size": Field(ge=1),
    "gradient_accumulation_steps": Field(ge=1),
    "logging_steps": Field(gt=0),
    "save_steps": Field(gt=0),
    "eval_steps": Field(gt=0),
    "warmup_steps": Field(ge=0),
    "dataloader_num_workers": Field(ge=0),
    "dataloader_prefetch_factor": Field(ge=1),
    "label_smoothing_factor": Field(ge=0, le=1),
    "seed": Field(ge=0, le=2**32 - 1),
    "data_seed": Field(ge=0, le=2**32 - 1),
}


def _plain(annotation) -> bool:
    """Whether a field's annotation is made of int, float, bool and None alone (the fields checked here)."""
    import types
    import typing

    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return all(_plain(part) for part in typing.get_args(annotation))
    return annotation in (int, float, bool, type(None))


@functools.cache
def _adapter(key: str) -> TypeAdapter | None:
    """The check of one TrainingArguments field's value, None for a field left to TrainingArguments."""
    import typing

    from transformers import TrainingArguments

    annotation = typing.get_type_hints(TrainingArguments).get(key)
    if not _plain(annotation):
        if key not in TRAINING_RANGES:
            return None
        annotation = float  # any number (an integer is one)
    rules = [TRAINING_RANGES[key]] if key in TRAINING_RANGES else []
    if float in (typing.get_args(annotation) or (annotation,)):
        rules.append(Field(allow_inf_nan=False))
    return TypeAdapter(Annotated[(annotation, *rules)] if rules else annotation, config=ConfigDict(strict=True))


def training_keywords(where: str, value) -> dict:
    """``value`` (a mapping, or None) as TrainingArguments keywords; ConfigError naming the key."""
    import dataclasses
    import math

    from transformers import TrainingArguments

    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    names = tuple(f.name for f in dataclasses.fields(TrainingArguments))
    unknown = sorted(str(key) for key in value if key not in names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
    forced = sorted(set(value) & set(FORCED_ARGS))
    if forced:
        raise ConfigError(
            f"{where}: {', '.join(forced)} are set by clinkd (output_dir per stage, resume with clinkd train --resume)"
        )
    for key, item in value.items():
        adapter = _adapter(key)
        if adapter is None:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{where}.{key} must be a finite number, got {item!r}")
            continue
        try:
            adapter.validate_python(item)
        except ValidationError as e:
            problem = phrase(e.errors(include_url=False)[0], _allowed(key), unquote_hint=True)
            raise ConfigError(f"{where}.{key}{problem}") from None
    return dict(value)


def _allowed(key: str) -> str | None:
    """What a value of ``key`` may be, in words (None: pydantic's error type says it)."""
    import typing

    from transformers import TrainingArguments

    annotation = typing.get_type_hints(TrainingArguments).get(key)
    parts = typing.get_args(annotation) if _plain(annotation) and typing.get_args(annotation) else (annotation,)
    names = {bool: "true/false", int: "an integer", float: "a number", type(None): "null"}
    shown = [p for p in parts if not (p is int and float in parts)]
    return " or ".join(dict.fromkeys(names.get(p, "a number") for p in shown))


__all__ = ["FORCED_ARGS", "TRAINING_RANGES", "training_keywords"]
