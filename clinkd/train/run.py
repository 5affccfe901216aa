"""From a RunConfig to trained stages: everything is checked first, then the stages run in order.

    config = load_config("run.yaml")          # or load_config(preset="tiny", overrides=[...])
    prepared = prepare_run(config)            # processor, data (every record checked), model configs
    result = run_training(config)             # KD stage(s) and SFT stage(s), resumable

Folder layout under ``output_dir``:

    processor/                    an offline processor (built once, reused on resume)
    pseudo_labels/                the store of a kd stage with teacher: store (default place)
    <stage>/checkpoint-N/         Trainer checkpoints (resume continues from the last one)
    <stage>/final/                the student after the stage (from_pretrained-able, with the processor,
                                  and clinkd_patch.json: the patch it was trained with, which
                                  ``clinkd predict`` applies)
    <stage>/adapter/              a LoRA stage's adapter (PEFT's adapter_config.json, adapter_model.safetensors);
                                  its final then holds the adapter merged into the weights (clinkd.train.lora)
    <stage>/stage.json            written when the stage is complete (its log history)
    <rct stage>/round-r/          an rct stage's rounds: corrections.jsonl, checkpoints, final/, round.json
                                  (clinkd.train.rct_stage); the stage's final is its last round's

``run_training(resume=True)`` skips complete stages (loading the student from their ``final``) and
resumes the interrupted one from its last checkpoint; with ``resume=False`` an output folder that
already holds stages is an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from clinkd.io import write_bytes_atomic
from clinkd.patch.record import PATCH_RECORD, patch_positions, read_patch_record, write_patch_record

from ..data.collate import Qwen2VLCollator
from ..data.dataset import ClinKDDataset
from ..data.encode import SampleEncoder
from ..data.offline_processor import (build_offline_processor, load_processor, special_token_ids,
                                      tokenizer_fingerprint)
from ..data.paths import folder_problem
from ..data.records import Record, load_records
from ..distill.store import PseudoLabelStore, StoreMeta, _check_meta, _read_manifest
from .config import ConfigError, ModelSpec, RunConfig, StageSpec
from .trainer import KDSettings

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

try:  # what transformers' configs raise for a field of the wrong type
    from huggingface_hub.errors import StrictDataclassError as _StrictDataclassError
except ImportError:  # an older huggingface_hub: configs raise TypeError / ValueError
    _StrictDataclassError = ValueError


@dataclass
class PreparedRun:
    """What ``prepare_run`` checked and built: the processor, the data set (every record checked),
    the collator, and the model configs (no weights loaded yet)."""

    config: RunConfig
    processor: object
    dataset: ClinKDDataset
    collator: Qwen2VLCollator
    model_configs: dict


# ------------------------------------------------------------------ processor and models


OFFLINE_RECORD = "clinkd_offline.json"  # beside a saved offline processor: the options it was built with


def _processor(config: RunConfig, records: list[Record] | None = None):
    """The run's processor: offline (built from the training texts, saved under output_dir and reused,
    as long as it was built with the same options) or loaded. ConfigError naming ``config.processor``
    for options the builder refuses, a processor that does not load, or one that is not Qwen2-VL's.
    ``records``: the loaded training records (read from ``config.data`` when not given)."""
    spec = config.processor
    if "offline" in spec:
        options = dict(spec["offline"] or {})
        saved = Path(config.output_dir) / "processor"
        if (saved / "processor_config.json").is_file():
            _check_saved_options(saved, options)
            processor = load_processor(str(saved))
        else:
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
        where = "config.processor.offline"
    else:
        path = spec.get("from_pretrained") or config.student.from_pretrained
        where = "config.processor.from_pretrained" if spec.get("from_pretrained") else \
            "config.models.student.from_pretrained (the processor's default)"
        try:
            processor = load_processor(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the processor from {path!r}: {e}") from None
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise ConfigError(f"{where}: {type(processor).__name__} is not an image-and-text processor (it needs a "
                          "tokenizer and an image processor)")
    try:
        special_token_ids(processor.tokenizer)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return processor


def _check_saved_options(saved: Path, options: dict) -> None:
    """A processor saved by an earlier run is reused only when it was built with these options (a
    processor saved before the options were recorded is reused as it is)."""
    record = saved / OFFLINE_RECORD
    if not record.is_file():
        return
    try:
        before = json.loads(record.read_text(encoding="utf-8"))["offline"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{record} is unreadable, so the processor saved in {saved} cannot be matched to "
                          f"config.processor.offline; delete {saved} to rebuild it") from None
    if before != options:
        raise ConfigError(f"config.processor.offline {options} differs from the options {before} the processor "
                          f"saved in {saved} was built with; restore them, or use another output_dir (or delete "
                          f"{saved} to rebuild it)")


def model_config(spec: ModelSpec, tokenizer, where: str):
    """The transformers config of a model spec (no weights). A ``config`` mapping gets the tokenizer's
    vocabulary size and Qwen2-VL special token ids where it does not set them."""
    from transformers import AutoConfig

    if spec.from_pretrained is not None:
        try:
            return AutoConfig.from_pretrained(spec.from_pretrained)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}: cannot load a config from {spec.from_pretrained!r}: {e}") from None
    mapping = json.loads(json.dumps(spec.config))
    model_type = mapping.pop("model_type", "qwen2_vl")
    ids = special_token_ids(tokenizer)
    for key in ("text_config", "vision_config"):
        if mapping.get(key) is not None and not isinstance(mapping[key], dict):
            raise ConfigError(f"{where}.config.{key} must be a mapping of config fields, got {mapping[key]!r:.80}")
    text = mapping.setdefault("text_config", {})
    text.setdefault("vocab_size", len(tokenizer))
    text.setdefault("pad_token_id", ids["pad_token_id"])
    text.setdefault("eos_token_id", ids["eos_token_id"])
    text.setdefault("bos_token_id", None)
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        mapping.setdefault(key, ids[key])
    try:
        return AutoConfig.for_model(model_type, **mapping)
    except (TypeError, ValueError, KeyError, _StrictDataclassError) as e:  # the last: a field of the wrong type
        message = " ".join(str(e).split())
        raise ConfigError(f"{where}.config is not a valid {model_type} config: {message}") from None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_architecture(cfg, where: str) -> None:
    """The shape rules a Qwen2-VL-style config must follow for its forward pass to run, which building
    the config (and the model) does not enforce: positive sizes, key/value heads dividing the query
    heads, an even head_dim, M-RoPE sections summing to head_dim / 2, vision heads dividing the vision width
    (with a head_dim the 2-D rotary can split), the vision merger's width equal to the text hidden size.
    Each rule is what the forward pass needs, no more (tests/cli/test_bad_input.py runs what passes).
    ``where`` names the config (``config.models.student.config``); ConfigError names the field."""
    text = getattr(cfg, "text_config", None)
    vision = getattr(cfg, "vision_config", None)
    if text is None:
        return  # not a Qwen2-VL-style config: building the model is the check
    t = f"{where}.text_config"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads"):
        value = getattr(text, key, None)
        if value is not None and not _positive_int(value):
            raise ConfigError(f"{t}.{key} must be a positive integer, got {value!r}")
    hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    if hidden and heads:
        if heads % kv:
            raise ConfigError(f"{t}: num_attention_heads {heads} must be a multiple of num_key_value_heads {kv}")
        head_dim = getattr(text, "head_dim", None)
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"{t}: hidden_size {hidden} must be divisible by num_attention_heads {heads}")
            head_dim = hidden // heads
        if not _positive_int(head_dim) or head_dim % 2:
            raise ConfigError(f"{t}: head_dim {head_dim} must be an even positive integer (rotary embedding)")
        rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
        section = rope.get("mrope_section") if isinstance(rope, dict) else None
        if section is not None:  # the rotary tables are split into these sections: they must cover head_dim / 2
            if not (isinstance(section, (list, tuple)) and section
                    and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in section)
                    and sum(section) == head_dim // 2):
                raise ConfigError(f"{t}.rope_parameters.mrope_section must be integers >= 0 summing to "
                                  f"head_dim / 2 = {head_dim // 2} (Qwen2-VL: 3 sections, t, h, w), got {section!r}")
    if vision is None:
        return
    v = f"{where}.vision_config"
    for key in ("depth", "embed_dim", "hidden_size", "num_heads", "patch_size", "spatial_merge_size",
                "temporal_patch_size", "in_channels"):
        value = getattr(vision, key, None)
        if value is not None and not _positive_int(value):
            raise ConfigError(f"{v}.{key} must be a positive integer, got {value!r}")
    ratio = getattr(vision, "mlp_ratio", None)
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0):
        raise ConfigError(f"{v}.mlp_ratio must be a positive number, got {ratio!r}")
    # Qwen2-VL names the tower's width embed_dim and the merger's output hidden_size; Qwen2.5-VL and
    # Qwen3-VL name them hidden_size and out_hidden_size.
    merged = hasattr(vision, "out_hidden_size")
    width_key, out_key = ("hidden_size", "out_hidden_size") if merged else ("embed_dim", "hidden_size")
    width, vheads = getattr(vision, width_key, None), getattr(vision, "num_heads", None)
    if width and vheads and (width % vheads or (width // vheads) % 4):
        raise ConfigError(f"{v}: {width_key} {width} / num_heads {vheads} must be a whole head_dim divisible by 4 "
                          "(the vision tower's 2-D rotary embedding)")
    out = getattr(vision, out_key, None)
    if out is not None and hidden is not None and out != hidden:
        raise ConfigError(f"{v}.{out_key} {out} must equal text_config.hidden_size {hidden} (the vision "
                          "merger writes image features into the text model's embedding)")


_BUILD_ERRORS = (ValueError, TypeError, RuntimeError, KeyError, IndexError, ZeroDivisionError, ImportError)


def check_buildable(cfg, where: str) -> None:
    """Build the model of ``cfg`` on the meta device (no memory, no weights): what transformers'
    constructors refuse is a ConfigError naming ``where`` before any weights load."""
    from transformers import AutoModelForImageTextToText

    try:
        with torch.device("meta"):
            AutoModelForImageTextToText.from_config(cfg)
    except _BUILD_ERRORS as e:
        message = " ".join(str(e).split())
        raise ConfigError(f"{where}: transformers cannot build this model: {message}") from None


@contextlib.contextmanager
def _quiet():
    """transformers' log warnings and Python warnings silenced while a user's config is checked: what is
    wrong with it is reported once, as the ConfigError (the command line's one line), not as lines before
    it. (The real build, after the checks, warns as usual.)"""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)


def _vocab(cfg) -> int:
    text = getattr(cfg, "text_config", cfg)
    return int(text.vocab_size)


def check_models(configs: dict, processor) -> None:
    """Model/tokenizer/processor agreement, before any weights are loaded."""
    tokenizer = processor.tokenizer
    ids = special_token_ids(tokenizer)
    image = processor.image_processor
    for role, cfg in configs.items():
        where = f"config.models.{role}"
        if _vocab(cfg) < len(tokenizer):
            raise ConfigError(f"{where}: vocabulary {_vocab(cfg)} is smaller than the tokenizer's {len(tokenizer)}")
        if getattr(cfg, "image_token_id", ids["image_token_id"]) != ids["image_token_id"]:
            raise ConfigError(f"{where}: image_token_id {cfg.image_token_id} is not the tokenizer's <|image_pad|> "
                              f"id {ids['image_token_id']}")
        vision = getattr(cfg, "vision_config", None)
        for key, attr in (("patch_size", "patch_size"), ("spatial_merge_size", "merge_size"),
                          ("temporal_patch_size", "temporal_patch_size")):
            mine, theirs = getattr(vision, key, None), getattr(image, attr, None)
            if mine is not None and theirs is not None and int(mine) != int(theirs):
                raise ConfigError(f"{where}: vision_config.{key}={mine} differs from the image processor's "
                                  f"{attr}={theirs}")
    if "teacher" in configs and _vocab(configs["teacher"]) < _vocab(configs["student"]):
        raise ConfigError(f"config.models.teacher: vocabulary {_vocab(configs['teacher'])} is smaller than the "
                          f"student's {_vocab(configs['student'])}; the teacher must cover every student token")


def check_patch(spec: ModelSpec, cfg, where: str) -> None:
    """The patch's own checks of this model config (``clinkd.patch.check_patchable``: head_dim of the
    fused attention, mrope sections, ...) and of the installed transformers, before anything runs;
    ConfigError naming ``where.patch``."""
    if spec.patch is None:
        return
    from clinkd.patch import check_patchable, check_transformers_version

    try:
        check_transformers_version()
        check_patchable(cfg, **spec.patch)
    except RuntimeError as e:  # a transformers outside the supported window
        raise ConfigError(f"{where}.patch: {e}") from None
    except (TypeError, ValueError) as e:
        message = str(e).replace("patch with attention=False", f"set {where}.patch.attention: false")
        raise ConfigError(f"{where}.patch: {message}") from None


def check_lora(config: RunConfig, cfg) -> None:
    """The LoRA settings of the run and its stages: peft installed, every target a linear layer of the
    student's text decoder (on the model built on the meta device). ConfigError naming the key."""
    specs = ([("config.lora", config.lora)] if config.lora is not None else []) + \
        [(stage.lora_key, stage.lora) for stage in config.stages if stage.lora is not None]
    if not specs:
        return
    from transformers import AutoModelForImageTextToText

    from .lora import decoder_linears, peft_problem, target_problem

    problem = peft_problem()
    if problem is not None:
        raise ConfigError(f"{specs[0][0]}: {problem}")
    with _quiet(), torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    try:
        _, names = decoder_linears(model)
    except (TypeError, AttributeError) as e:
        raise ConfigError(f"{specs[0][0]}: {e}") from None
    for key, spec in specs:
        problem = target_problem(spec, names)
        if problem is not None:
            raise ConfigError(f"{key}.target_modules: {problem}")


def build_model(spec: ModelSpec, cfg, *, seed: int):
    """Load (from_pretrained) or randomly initialise (config, seeded) a model, then apply its patch."""
    from transformers import AutoModelForImageTextToText, set_seed

    dtype = _TORCH_DTYPES[spec.dtype]
    if spec.from_pretrained is not None:
        model = AutoModelForImageTextToText.from_pretrained(spec.from_pretrained, dtype=dtype)
    else:
        set_seed(seed)
        model = AutoModelForImageTextToText.from_config(cfg).to(dtype)
    if spec.patch is not None:
        from clinkd.patch import patch_qwen2_vl

        try:
            model = patch_qwen2_vl(model, **spec.patch)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot patch {spec.model_id()}: {e}") from None
    return model


def check_similarity(stage: StageSpec, where: str) -> None:
    """The similarity model of an rct stage can be found (a folder, or an installed package shipping one),
    unless it is ROUGE-L or a ROUGE-L fallback is allowed: ConfigError naming ``where.similarity.model``."""
    from clinkd.rct.similarity import DEFAULT_MODEL, LEXICAL, SimilarityError, model_folder

    spec = stage.rct.similarity
    model = spec.get("model", DEFAULT_MODEL)
    if model == LEXICAL or spec.get("fallback") == LEXICAL:
        return
    try:
        model_folder(model)
    except SimilarityError as e:
        raise ConfigError(f"{where}.similarity.model: {e}") from None


# ------------------------------------------------------------------ stores


def store_meta(config: RunConfig, stage: StageSpec, processor, student_vocab: int) -> StoreMeta:
    return StoreMeta(teacher=config.teacher.model_id(), k=int(stage.topk), temperature=float(stage.temperature),
                     vocab_size=student_vocab, tokenizer_hash=tokenizer_fingerprint(processor.tokenizer))


def _check_existing_store(config: RunConfig, stage: StageSpec, meta: StoreMeta) -> None:
    path = config.store_path(stage)
    manifest = _read_manifest(path) if path.exists() else None
    if manifest is not None:
        _check_meta(path, manifest["meta"], meta)


# ------------------------------------------------------------------ prepare and run


def prepare_run(config: RunConfig, *, progress: bool = False) -> PreparedRun:
    """Every check that does not need weights, in the order of their cost: output folders; each stage's
    training arguments, optimizer and schedule; every record (tasks, boxes, modalities, images); the
    processor; the model configs (shape rules, built on the meta device), model/tokenizer agreement,
    teacher vocabulary, the patch; every sample's encoding (images readable, supervised tokens after
    truncation); existing stores' metadata. ``clinkd check`` and ``clinkd train`` both run it first."""
    check_output_paths(config)
    with _quiet():
        check_training_arguments(config)
    records = load_records(config.data.train, root=config.data.root, check_images=True)
    processor = _processor(config, records)
    with _quiet():
        configs = {"student": model_config(config.student, processor.tokenizer, "config.models.student")}
        if config.teacher is not None and any(s.type == "kd" for s in config.stages):
            configs["teacher"] = model_config(config.teacher, processor.tokenizer, "config.models.teacher")
        for role, cfg in configs.items():
            spec = config.models[role]
            where = f"config.models.{role}" + (".config" if spec.config is not None else
                                               f" (the config of {spec.from_pretrained})")
            check_architecture(cfg, where)
            check_buildable(cfg, where)
    check_models(configs, processor)
    for role, cfg in configs.items():
        check_patch(config.models[role], cfg, f"config.models.{role}")
    check_lora(config, configs["student"])
    for i, stage in enumerate(config.stages):
        if stage.type == "rct":
            check_similarity(stage, f"config.stages[{i}]")
    for i, stage in enumerate(config.stages):
        if stage.type == "kd" and stage.topk is not None and stage.topk > _vocab(configs["student"]):
            raise ConfigError(f"config.stages[{i}].topk={stage.topk} exceeds the student's vocabulary "
                              f"{_vocab(configs['student'])}")
    try:
        encoder = SampleEncoder(processor, max_length=config.data.max_length)
    except ValueError as e:
        raise ConfigError(f"config.processor: {e}") from None
    dataset = ClinKDDataset(records, encoder)
    dataset.validate(progress=progress)
    for stage in config.stages:
        if stage.type == "kd" and stage.teacher == "store":
            _check_existing_store(config, stage, store_meta(config, stage, processor, _vocab(configs["student"])))
    ids = special_token_ids(processor.tokenizer)
    collator = Qwen2VLCollator(pad_token_id=ids["pad_token_id"], image_token_id=ids["image_token_id"],
                               pad_to_multiple_of=config.data.pad_to_multiple_of, packing=config.data.packing)
    return PreparedRun(config, processor, dataset, collator, configs)


def _training_arguments(config: RunConfig, stage: StageSpec, *, progress: bool, output_dir: str | None = None,
                        overrides: dict | None = None):
    from transformers import TrainingArguments

    kwargs = {"report_to": "none", **config.stage_args(stage), **(overrides or {})}
    kwargs.setdefault("seed", config.seed)
    if not progress:
        kwargs["disable_tqdm"] = True
    return TrainingArguments(output_dir=output_dir or str(Path(config.output_dir) / stage.name),
                             remove_unused_columns=False, label_names=["labels"], **kwargs)


_NEEDS_MODEL = ("galore", "apollo", "lomo")  # optimizers transformers builds from the model itself


def check_training_arguments(config: RunConfig) -> None:
    """Each stage's TrainingArguments built (in a throwaway folder), then its optimizer and learning-rate
    schedule built on a stand-in parameter, and its loggers (report_to) looked up: what transformers or
    torch refuse there is a ConfigError naming the stage, before any data or model is loaded."""
    from transformers import Trainer
    from transformers.integrations import get_available_reporting_integrations
    from transformers.optimization import get_scheduler

    with tempfile.TemporaryDirectory(prefix="clinkd-check-") as scratch:
        for i, stage in enumerate(config.stages):
            where = f"config.stages[{i}].training (stage {stage.name!r}, over config.training)"
            try:
                args = _training_arguments(config, stage, progress=False, output_dir=scratch)
            except (TypeError, ValueError, ImportError) as e:
                raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None
            for name in args.report_to or ():
                if name not in ("none", "all") and name not in get_available_reporting_integrations():
                    raise ConfigError(f"{where}: report_to {name!r} is not an available logger (installed: "
                                      f"{', '.join(get_available_reporting_integrations()) or 'none'})")
            _check_deepspeed(args.deepspeed, where)
            if stage.lora is not None:
                _check_lora_engine(args, stage, i)
            optim = getattr(args.optim, "value", args.optim)
            if any(n in str(optim) for n in _NEEDS_MODEL):
                continue
            try:
                cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
                optimizer = cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
            except (TypeError, ValueError, ImportError, RuntimeError) as e:
                raise ConfigError(f"{where}: the optimizer {optim} refuses its settings (learning_rate, "
                                  f"adam_*, optim_args): {' '.join(str(e).split())}") from None
            steps = args.max_steps if args.max_steps > 0 else 1000
            try:
                get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(steps),
                              num_training_steps=steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
            except (TypeError, ValueError, KeyError) as e:
                raise ConfigError(f"{where}: the schedule {getattr(args.lr_scheduler_type, 'value', '')} "
                                  "refuses its settings "
                                  f"(lr_scheduler_kwargs, warmup_steps): {' '.join(str(e).split())}") from None


def _deepspeed_zero(value, where: str) -> dict:
    """The zero_optimization mapping of a DeepSpeed config (a mapping or a JSON file), {} when none."""
    if value is None:
        return {}
    if isinstance(value, (str, os.PathLike)):
        try:
            value = json.loads(Path(value).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}.deepspeed: cannot read the DeepSpeed config {value}: {e}") from None
    zero = value.get("zero_optimization", {}) if isinstance(value, dict) else {}
    return zero if isinstance(zero, dict) else {}


def _check_lora_engine(args, stage: StageSpec, index: int) -> None:
    """A LoRA stage merges its adapter into the full weights: not under DeepSpeed ZeRO-3 or FSDP, which
    shard them."""
    where = f"config.stages[{index}].training (stage {stage.name!r}, over config.training)"
    engine = ("DeepSpeed ZeRO-3" if _deepspeed_zero(args.deepspeed, where).get("stage") == 3 else
              "FSDP" if args.fsdp else None)
    if engine is not None:
        raise ConfigError(f"{stage.lora_key}: stage {stage.name!r} trains LoRA adapters, which cannot run under "
                          f"{engine}: merging the adapter into the stage's final weights needs the full weights on "
                          "every process (use DeepSpeed ZeRO-1/2 or DDP, or full fine-tuning)")


def _check_deepspeed(value, where: str) -> None:
    """A ZeRO-3 DeepSpeed config must gather the weights when a model is saved: without
    ``stage3_gather_16bit_weights_on_model_save`` every stage's ``final`` folder would hold no weights."""
    zero = _deepspeed_zero(value, where)
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise ConfigError(f"{where}.deepspeed: a ZeRO-3 config needs zero_optimization."
                          "stage3_gather_16bit_weights_on_model_save: true, or the stages' final folders hold no "
                          "weights (docs/examples/distributed/zero3.json has it)")


def check_output_paths(config: RunConfig) -> None:
    """output_dir, each stage's folder and each store can be written (existing folders, or creatable):
    ConfigError naming the key before anything is built."""
    out = Path(config.output_dir)
    problem = folder_problem(out)
    if problem is not None:
        raise ConfigError(f"config.output_dir {out} {problem}")
    for i, stage in enumerate(config.stages):
        folder = out / stage.name
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"config.stages[{i}].name: {folder} is a file, not the stage's folder")
        if stage.type == "kd" and stage.teacher == "store":
            store = config.store_path(stage)
            problem = folder_problem(store)
            if problem is not None:
                key = f"config.stages[{i}].store" if stage.store else "config.output_dir (its pseudo_labels store)"
                raise ConfigError(f"{key}: {store} {problem}")
    if "offline" in config.processor and (out / "processor").exists() and not (out / "processor").is_dir():
        raise ConfigError(f"config.output_dir: {out / 'processor'} is a file, not the processor's folder")


def ensure_store(prepared: PreparedRun, stage: StageSpec, teacher_factory, *, progress: bool = True) -> PseudoLabelStore:
    """The complete store of a kd stage: built (or resumed) with the teacher when needed, then opened
    with its metadata checked against this run."""
    from ..distill.cache import cache_pseudo_labels

    config = prepared.config
    meta = store_meta(config, stage, prepared.processor, _vocab(prepared.model_configs["student"]))
    path = config.store_path(stage)
    manifest = _read_manifest(path) if path.exists() else None
    if manifest is None or not manifest.get("complete"):
        cache_pseudo_labels(teacher_factory(), prepared.dataset, prepared.collator, path, meta=meta,
                            batch_size=stage.cache_batch_size, shard_size=stage.shard_size, progress=progress)
    return PseudoLabelStore(path, expect=meta)


def _distributed_state(config: RunConfig):
    """accelerate's process state (the one Trainer uses). Without GPUs, several launched processes join
    one gloo group (accelerate alone would leave each on its own). A DeepSpeed run takes its state from
    its training arguments, which put accelerate in DeepSpeed's mode. Launched as several processes
    (WORLD_SIZE > 1) that still did not join one group — DeepSpeed in several CPU processes, say — they
    would train apart, each on all the data: a RuntimeError says so instead."""
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = next((s for s in config.stages if config.stage_args(s).get("deepspeed")), None)
    if deepspeed is not None:
        with tempfile.TemporaryDirectory(prefix="clinkd-state-") as scratch:
            _training_arguments(config, deepspeed, progress=False, output_dir=scratch).device  # sets the state up
        state = PartialState()
    else:
        state = PartialState(cpu=not torch.cuda.is_available() and launched > 1)
    if launched > 1 and state.num_processes != launched:
        hint = ("DeepSpeed through clinkd train needs GPUs for more than one process" if deepspeed is not None else
                "on CPUs launch with ACCELERATE_USE_CPU=true")
        raise RuntimeError(f"launched as {launched} processes (WORLD_SIZE), but they did not join one process group "
                           f"(accelerate sees {state.num_processes}): they would train apart; {hint}")
    return state


def run_training(config: RunConfig, *, resume: bool = True, progress: bool = True, callbacks=None,
                 prepared: PreparedRun | None = None) -> dict:
    """Run every stage of ``config`` (after ``prepare_run``'s checks). Returns {stage: {"final": path,
    "log_history": [...]}}. ``callbacks``: extra TrainerCallbacks for every stage."""
    from transformers.trainer_utils import get_last_checkpoint

    from .trainer import ClinKDTrainer

    state = _distributed_state(config)
    if prepared is None:
        with state.main_process_first():  # the main process builds what is shared (the offline processor)
            prepared = prepare_run(config, progress=progress and state.is_main_process)
    out = Path(config.output_dir)
    if state.num_processes > 1 and any(s.type == "rct" for s in config.stages):
        raise ConfigError(f"the rct stage runs in one process; this run has {state.num_processes} (train the kd and sft "
                          "stages distributed, then the rct stage alone)")
    if not resume:
        existing = [s.name for s in config.stages if (out / s.name).exists()]
        if existing:
            raise ConfigError(f"{out} already holds stage folders {existing}; resume the run or use another output_dir")
    student_spec, seed = config.student, config.seed
    teacher = None

    def teacher_factory():
        nonlocal teacher
        if teacher is None:
            teacher = build_model(config.teacher, prepared.model_configs["teacher"], seed=seed + 1)
        return teacher

    student = None
    results = {}

    def load_student(path):  # a saved student (an earlier stage's or round's final), or the run's own
        spec = student_spec if path is None else ModelSpec(from_pretrained=str(path), dtype=config.student.dtype,
                                                            patch=config.student.patch)
        return build_model(spec, prepared.model_configs["student"], seed=seed)

    def stage_arguments(stage, output_dir, overrides):
        return _training_arguments(config, stage, progress=progress, output_dir=output_dir, overrides=overrides)

    base = config.student.from_pretrained  # the folder the next stage's student comes from (None: random init)
    for index, stage in enumerate(config.stages):
        stage_dir = out / stage.name
        done = stage_dir / "stage.json"
        if resume and done.is_file():
            results[stage.name] = json.loads(done.read_text())
            base = results[stage.name].get("final", str(stage_dir / "final"))
            student_spec = ModelSpec(from_pretrained=base, dtype=config.student.dtype, patch=config.student.patch)
            student = None
            continue
        if stage.type == "rct":
            from .rct_stage import run_rct_stage

            student, result = run_rct_stage(prepared, stage, student, load_student=load_student,
                                            training_arguments=stage_arguments, resume=resume, progress=progress,
                                            callbacks=callbacks, base=base)
            if state.is_main_process:
                write_bytes_atomic(done, json.dumps(result, indent=1).encode())
            state.wait_for_everyone()
            results[stage.name] = result
            base = result["final"]
            student_spec = ModelSpec(from_pretrained=base, dtype=config.student.dtype, patch=config.student.patch)
            continue
        if student is None:
            student = load_student(None)
        kd, store, online = None, None, None
        if stage.type == "kd":
            kd = KDSettings(topk=stage.topk, temperature=stage.temperature, alpha=stage.alpha, beta=stage.beta,
                            t2_scale=stage.t2_scale, curriculum=stage.curriculum, form=stage.loss_form)
            if stage.teacher == "store":
                with state.main_process_first():  # built by the main process; the others open it after
                    store = ensure_store(prepared, stage, teacher_factory, progress=progress and state.is_main_process)
            else:
                online = teacher_factory()
        args = _training_arguments(config, stage, progress=progress)
        model = student
        if stage.lora is not None:  # the patched student wrapped with LoRA adapters (clinkd.train.lora)
            from .lora import wrap_lora

            model = wrap_lora(student, stage.lora, base=base)
        trainer = ClinKDTrainer(model=model, args=args, train_dataset=prepared.dataset,
                                data_collator=prepared.collator, processing_class=prepared.processor, kd=kd,
                                teacher=online, store=store, callbacks=callbacks,
                                kernel_backend=(config.student.patch or {}).get("backend"))
        if stage.lora is not None:
            from .lora import check_engine

            check_engine(trainer, f"config.stages[{index}] ({stage.name})")
        checkpoint = get_last_checkpoint(str(stage_dir)) if resume and stage_dir.is_dir() else None
        trainer.train(resume_from_checkpoint=checkpoint)
        final = stage_dir / "final"
        result = {"final": str(final), "log_history": trainer.state.log_history}
        if stage.lora is not None:  # the adapter, then the merged weights in final (with the patch record)
            from .lora import save_lora_stage

            student = save_lora_stage(trainer, final, stage_dir / "adapter", patch=config.student.patch)
            result.update(adapter=str(stage_dir / "adapter"), lora=stage.lora.as_dict())
        else:
            trainer.save_model(str(final))
        if trainer.is_world_process_zero():  # the process that saved the model writes what goes with it
            if stage.lora is None:
                write_patch_record(final, config.student.patch)
            write_bytes_atomic(done, json.dumps(result, indent=1).encode())
        trainer.accelerator.wait_for_everyone()
        results[stage.name] = result
        base = str(final)
        if stage.type == "kd" and teacher is not None and not any(
                s.type == "kd" for s in config.stages[config.stages.index(stage) + 1:]):
            teacher = None  # no later kd stage: free its memory
    return results


__all__ = ["PATCH_RECORD", "PreparedRun", "build_model", "check_architecture", "check_buildable", "check_lora",
           "check_models",
           "check_output_paths", "check_patch", "check_similarity", "check_training_arguments", "ensure_store", "model_config",
           "patch_positions", "prepare_run", "read_patch_record", "run_training", "store_meta", "write_patch_record"]
