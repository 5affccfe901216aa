"""Each section of a run config mapping → its typed spec (``clinkd.train.specs``), checked.

The keys, types and ranges are the pydantic models' of ``clinkd.train.schema``; what is checked here is
what a model of one mapping cannot say: one key against another, a stage's type choosing its keys, the
curriculum's and the rct rounds' own rules, a stage's LoRA settings over the run's. Keys a mapping leaves
out take the specs' defaults. Paths are resolved by ``resolve`` (str → str: ~ expanded, relative to the
config file's folder). Every problem is a ConfigError whose one line names the key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from clinkd.patch.spec import patch_spec

from ..data.records import show
from .curriculum import MarginCurriculum
from .errors import ConfigError
from .schema import (
    STAGE_KEYS,
    CurriculumKeys,
    DataKeys,
    LoraKeys,
    ModelKeys,
    OfflineKeys,
    ProcessorKeys,
    RCTKeys,
    SimilarityKeys,
    StageKeys,
    checked,
    path_text,
)
from .specs import DataSpec, KDStage, LoraSpec, ModelSpec, RCTStage, SFTStage, StageSpec, loss_form_problem
from .training_keys import training_keywords

RESERVED_FOLDERS = ("processor", "pseudo_labels")  # what the run itself keeps in output_dir
LORA_KEYS = tuple(LoraKeys.model_fields)
Resolve = Callable[[str], str]


def model_spec(where: str, value, *, default_patch, resolve: Resolve | None = None) -> ModelSpec:
    """``models.<role>``: exactly one of from_pretrained or config; ``patch`` (absent: ``default_patch``)
    checked by ``clinkd.patch.spec.patch_spec``. A from_pretrained path that exists is resolved."""
    keys = {} if value is None else value  # exactly one of the two first, on a mapping of known keys
    if (
        isinstance(keys, dict)
        and set(keys) <= set(ModelKeys.model_fields)
        and (keys.get("from_pretrained") is None) == (keys.get("config") is None)
    ):
        raise ConfigError(
            f"{where} needs exactly one of from_pretrained (a path or hub id) or config "
            "(a Qwen2VLConfig mapping for random init)"
        )
    given = checked(ModelKeys, value, where).given()
    try:
        patch = patch_spec(given.pop("patch", default_patch), f"{where}.patch")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    path = given.get("from_pretrained")
    if path and resolve is not None and os.path.exists(resolve(path)):
        given["from_pretrained"] = resolve(path)
    return ModelSpec(**given, patch=patch)


def data_spec(where: str, value, resolve: Resolve) -> DataSpec:
    """``data``: the train file required; root defaults to its folder."""
    given = checked(DataKeys, value, where).given()
    if not isinstance(given.get("train"), str):
        raise ConfigError(f"{where}.train (the training data file) is required")
    try:
        path_text(given["train"])
    except ValueError as e:
        raise ConfigError(f"{where}.train{e}") from None
    given["train"] = resolve(given["train"])
    given["root"] = resolve(given["root"]) if given.get("root") else str(Path(given["train"]).parent)
    return DataSpec(**given)


def processor_spec(where: str, value, student: ModelSpec, resolve: Resolve) -> dict:
    """``processor``: {"offline": options}, {"from_pretrained": path} or {} (the student's folder)."""
    given = checked(ProcessorKeys, value, where).given()
    if len(given) > 1:
        raise ConfigError(f"{where} takes one of from_pretrained or offline")
    if "offline" in given:
        return {"offline": offline_options(f"{where}.offline", given["offline"])}
    if "from_pretrained" in given:
        path = given["from_pretrained"]
        return {"from_pretrained": resolve(path) if os.path.exists(resolve(path)) else path}
    if student.from_pretrained is None:
        raise ConfigError(
            f"{where} is required when the student is built from a config "
            "(processor.from_pretrained: PATH, or processor.offline: {...})"
        )
    return {}


def offline_options(where: str, value) -> dict:
    """processor.offline: positive integers (min_frequency >= 0), min_pixels <= max_pixels (the builder,
    ``build_offline_processor``, checks the rest when ``prepare_run`` builds it)."""
    given = checked(OfflineKeys, value, where).given()
    low, high = given.get("min_pixels", 16 * 16), given.get("max_pixels", 32 * 32)
    if low > high:
        raise ConfigError(f"{where}: min_pixels {low} is larger than max_pixels {high}")
    return given


def lora_options(where: str, value) -> dict | None:
    """A ``lora`` value: None for null or false (full fine-tuning), {} for true (the defaults, or the
    run's settings in a stage), else the keys it gives, checked."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(
            f"{where} must be a mapping of LoRA settings ({', '.join(LORA_KEYS)}), true (the "
            f"defaults) or null (full fine-tuning), got {show(value)}"
        )
    given = checked(LoraKeys, value, where).given()
    if "target_modules" in given:
        given["target_modules"] = tuple(given["target_modules"])
    return given


def stage_spec(where: str, value, *, run_lora: dict | None, resolve: Resolve) -> StageSpec:
    """``stages[i]``: its type chooses its keys (``schema.STAGE_KEYS``); ``lora`` absent takes the run's
    settings (``run_lora``), a mapping its keys over them, true them (or the defaults), false or null none."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping with name and type")
    kind = value.get("type")
    if kind not in STAGE_KEYS:
        raise ConfigError(f"{where}.type must be one of {', '.join(STAGE_KEYS)}, got {show(kind)}")
    given = checked(STAGE_KEYS[kind], value, where).given()
    common = {
        "name": stage_name(f"{where}.name", given.get("name", kind)),
        "training": training_keywords(f"{where}.training", given.get("training")),
    }
    if "lora" in given:
        lora = lora_options(f"{where}.lora", given["lora"])
        common.update(lora=None if lora is None else LoraSpec(**{**(run_lora or {}), **lora}), lora_key=f"{where}.lora")
    else:
        common["lora"] = None if run_lora is None else LoraSpec(**run_lora)
    own = {key: item for key, item in given.items() if key not in StageKeys.model_fields}  # the type's keys
    if kind == "kd":
        return kd_stage(where, own, common, resolve)
    if kind == "rct":
        return RCTStage(**common, rct=rct_settings(where, own))
    return SFTStage(**common)


def stage_name(where: str, name) -> str:
    """A stage's folder name: plain (no /, not hidden), not one the run keeps, at most 255 bytes."""
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{where} must be a plain folder name, got {show(name)}")
    try:
        path_text(name)
    except ValueError as e:
        raise ConfigError(f"{where}{e}") from None
    if name in RESERVED_FOLDERS:
        raise ConfigError(
            f"{where} {name!r} cannot be a stage folder: the run keeps its "
            f"{' and '.join(RESERVED_FOLDERS)} folders in output_dir"
        )
    if len(os.fsencode(name)) > 255:
        raise ConfigError(f"{where} is longer than a folder name can be (255 bytes)")
    return name


def kd_stage(where: str, own: dict, common: dict, resolve: Resolve) -> KDStage:
    """A kd stage from its own keys (``loss_form`` is the KDSettings field ``form``)."""
    if own.get("curriculum") is not None:
        curriculum = checked(CurriculumKeys, own["curriculum"], f"{where}.curriculum").given()
        try:
            own["curriculum"] = MarginCurriculum(**curriculum)
        except ValueError as e:
            raise ConfigError(f"{where}.{e}") from None
    if "loss_form" in own:
        own["form"] = own.pop("loss_form")
    if own.get("store"):
        own["store"] = resolve(own["store"])
    values = {f.name: f.default for f in dataclasses.fields(KDStage) if f.default is not dataclasses.MISSING}
    values.update(own)  # the stage's values, its defaults where it gives none
    if values["topk"] is None and values["teacher"] == "store":  # a dense teacher gives no pseudo-labels to store
        raise ConfigError(f"{where}.topk must be an integer for teacher: store (a dense teacher needs teacher: online)")
    if values["alpha"] + values["beta"] <= 0:
        raise ConfigError(f"{where}: alpha + beta must be > 0")
    problem = loss_form_problem(values["form"], values["beta"], values["t2_scale"])
    if problem is not None:
        raise ConfigError(f"{where}.loss_form: {problem}")
    return KDStage(**common, **own)


RCT_ROUND_KEYS = tuple(
    key
    for key in RCTKeys.model_fields
    if key not in StageKeys.model_fields and key not in ("similarity_threshold", "iou_threshold", "similarity")
)


def rct_settings(where: str, own: dict):
    """An rct stage's keys → ``clinkd.rct.RCTSettings`` (its ValueError names the key)."""
    from clinkd.rct.scoring import Thresholds
    from clinkd.rct.settings import RCTSettings

    thresholds = {
        name: own[key] for key, name in (("similarity_threshold", "similarity"), ("iou_threshold", "iou")) if key in own
    }
    similarity = checked(SimilarityKeys, own.get("similarity"), f"{where}.similarity").given()
    try:
        return RCTSettings(
            **{key: own[key] for key in RCT_ROUND_KEYS if key in own},
            thresholds=Thresholds(**thresholds),
            similarity=similarity,
        )
    except ValueError as e:
        raise ConfigError(f"{where}.{e}") from None


__all__ = [
    "LORA_KEYS",
    "RESERVED_FOLDERS",
    "data_spec",
    "kd_stage",
    "lora_options",
    "model_spec",
    "offline_options",
    "processor_spec",
    "rct_settings",
    "stage_name",
    "stage_spec",
]
