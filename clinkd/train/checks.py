"""The checks ``prepare_run`` makes before any weights load; each raises a ConfigError naming the key.

* the run's folders (``check_output_paths``) and each stage's training arguments, optimizer, schedule,
  loggers and engine (``check_training_arguments``);
* each model config: the shape rules of its forward pass (``check_architecture``, with
  ``check_rotary_geometry``), built on the meta device (``check_buildable``), its agreement with the
  tokenizer and processor (``check_models``), the patch (``check_patch``), the LoRA targets
  (``check_lora``);
* an rct stage's similarity model (``check_similarity``).

``quiet()`` silences what transformers logs and warns while a user's config is checked.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from ..data.offline_processor import special_token_ids
from ..data.paths import folder_problem
from ..patch.geometry import merger_output, mrope_section, mrope_section_problem, vision_width
from .arguments import training_arguments
from .errors import ConfigError
from .models import vocab_size
from .specs import KDStage, ModelSpec, RCTStage, RunConfig, StageSpec


@contextlib.contextmanager
def quiet():
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


# ------------------------------------------------------------------ folders and training arguments


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
        if isinstance(stage, KDStage) and stage.teacher == "store":
            store = config.store_path(stage)
            problem = folder_problem(store)
            if problem is not None:
                key = f"config.stages[{i}].store" if stage.store else "config.output_dir (its pseudo_labels store)"
                raise ConfigError(f"{key}: {store} {problem}")
    if "offline" in config.processor and (out / "processor").exists() and not (out / "processor").is_dir():
        raise ConfigError(f"config.output_dir: {out / 'processor'} is a file, not the processor's folder")


_NEEDS_MODEL = ("galore", "apollo", "lomo")  # optimizers transformers builds from the model itself


def check_training_arguments(config: RunConfig) -> None:
    """Each stage's TrainingArguments built (in a throwaway folder), then its optimizer and learning-rate
    schedule built on a stand-in parameter, and its loggers (report_to) looked up: what transformers or
    torch refuse there is a ConfigError naming the stage, before any data or model is loaded."""
    with tempfile.TemporaryDirectory(prefix="clinkd-check-") as scratch:
        for i, stage in enumerate(config.stages):
            where = f"config.stages[{i}].training (stage {stage.name!r}, over config.training)"
            try:
                args = training_arguments(config, stage, progress=False, output_dir=scratch)
            except (TypeError, ValueError, ImportError) as e:
                raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None
            check_loggers(args, where)
            check_deepspeed(args.deepspeed, where)
            if stage.lora is not None:
                check_lora_engine(args, stage, i)
            check_optimizer_and_schedule(args, where)


def check_loggers(args, where: str) -> None:
    """Every logger of ``report_to`` is installed."""
    from transformers.integrations import get_available_reporting_integrations

    for name in args.report_to or ():
        if name not in ("none", "all") and name not in get_available_reporting_integrations():
            raise ConfigError(
                f"{where}: report_to {name!r} is not an available logger (installed: "
                f"{', '.join(get_available_reporting_integrations()) or 'none'})"
            )


def check_optimizer_and_schedule(args, where: str) -> None:
    """The optimizer and the learning-rate schedule of ``args``, built on a stand-in parameter (not the
    optimizers transformers builds from the model itself)."""
    from transformers import Trainer
    from transformers.optimization import get_scheduler

    optim = getattr(args.optim, "value", args.optim)
    if any(n in str(optim) for n in _NEEDS_MODEL):
        return
    try:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        optimizer = cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    except (TypeError, ValueError, ImportError, RuntimeError) as e:
        raise ConfigError(
            f"{where}: the optimizer {optim} refuses its settings (learning_rate, "
            f"adam_*, optim_args): {' '.join(str(e).split())}"
        ) from None
    steps = args.max_steps if args.max_steps > 0 else 1000
    try:
        get_scheduler(
            args.lr_scheduler_type,
            optimizer,
            num_warmup_steps=args.get_warmup_steps(steps),
            num_training_steps=steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs,
        )
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(
            f"{where}: the schedule {getattr(args.lr_scheduler_type, 'value', '')} "
            "refuses its settings "
            f"(lr_scheduler_kwargs, warmup_steps): {' '.join(str(e).split())}"
        ) from None


def deepspeed_zero(value, where: str) -> dict:
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


def check_lora_engine(args, stage: StageSpec, index: int) -> None:
    """A LoRA stage merges its adapter into the full weights: not under DeepSpeed ZeRO-3 or FSDP, which
    shard them."""
    where = f"config.stages[{index}].training (stage {stage.name!r}, over config.training)"
    engine = (
        "DeepSpeed ZeRO-3" if deepspeed_zero(args.deepspeed, where).get("stage") == 3 else "FSDP" if args.fsdp else None
    )
    if engine is not None:
        raise ConfigError(
            f"{stage.lora_key}: stage {stage.name!r} trains LoRA adapters, which cannot run under "
            f"{engine}: merging the adapter into the stage's final weights needs the full weights on "
            "every process (use DeepSpeed ZeRO-1/2 or DDP, or full fine-tuning)"
        )


def check_deepspeed(value, where: str) -> None:
    """A ZeRO-3 DeepSpeed config must gather the weights when a model is saved: without
    ``stage3_gather_16bit_weights_on_model_save`` every stage's ``final`` folder would hold no weights."""
    zero = deepspeed_zero(value, where)
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise ConfigError(
            f"{where}.deepspeed: a ZeRO-3 config needs zero_optimization."
            "stage3_gather_16bit_weights_on_model_save: true, or the stages' final folders hold no "
            "weights (docs/examples/distributed/zero3.json has it)"
        )


# ------------------------------------------------------------------ model configs


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_rotary_geometry(text, where: str) -> None:
    """The text decoder's rotary layout: head_dim (given, or hidden_size / num_attention_heads) an even
    positive integer, and the M-RoPE sections, where given, integers >= 0 summing to head_dim / 2 (the
    rotary tables are split into them). ``text``: a text config with hidden_size and num_attention_heads."""
    hidden, heads = text.hidden_size, text.num_attention_heads
    head_dim = getattr(text, "head_dim", None)
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"{where}: hidden_size {hidden} must be divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
    if not _positive_int(head_dim) or head_dim % 2:
        raise ConfigError(f"{where}: head_dim {head_dim} must be an even positive integer (rotary embedding)")
    section = mrope_section(text)
    if section is not None:  # the sum rule; the frequency layout is the family's (check_patch)
        problem = mrope_section_problem(section, head_dim, interleaved=False)
        if problem is not None:
            raise ConfigError(
                f"{where}.rope_parameters.mrope_section must be integers >= 0 summing to head_dim / 2 "
                f"= {head_dim // 2} (3 sections, t, h, w), got {section!r}: {problem}"
            )


def check_architecture(cfg, where: str) -> None:
    """The shape rules a Qwen2-VL-style config must follow for its forward pass to run, which building
    the config (and the model) does not enforce: positive sizes, key/value heads dividing the query
    heads, the rotary geometry (``check_rotary_geometry``), vision heads dividing the vision width (with a
    head_dim the 2-D rotary can split), the vision merger's width equal to the text hidden size.
    Each rule is what the forward pass needs, no more (tests/cli/test_bad_input.py runs what passes).
    ``where`` names the config (``config.models.student.config``); ConfigError names the field."""
    text = getattr(cfg, "text_config", None)
    if text is None:
        return  # not a Qwen2-VL-style config: building the model is the check
    t = f"{where}.text_config"
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    ):
        value = getattr(text, key, None)
        if value is not None and not _positive_int(value):
            raise ConfigError(f"{t}.{key} must be a positive integer, got {value!r}")
    hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    if hidden and heads:
        if heads % kv:
            raise ConfigError(f"{t}: num_attention_heads {heads} must be a multiple of num_key_value_heads {kv}")
        check_rotary_geometry(text, t)
    vision = getattr(cfg, "vision_config", None)
    if vision is not None:
        check_vision_tower(vision, f"{where}.vision_config", hidden)


def check_vision_tower(vision, where: str, text_hidden: int | None) -> None:
    """The vision tower's shape rules (see ``check_architecture``); ``text_hidden``: the text hidden size."""
    for key in (
        "depth",
        "embed_dim",
        "hidden_size",
        "num_heads",
        "patch_size",
        "spatial_merge_size",
        "temporal_patch_size",
        "in_channels",
    ):
        value = getattr(vision, key, None)
        if value is not None and not _positive_int(value):
            raise ConfigError(f"{where}.{key} must be a positive integer, got {value!r}")
    ratio = getattr(vision, "mlp_ratio", None)
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0):
        raise ConfigError(f"{where}.mlp_ratio must be a positive number, got {ratio!r}")
    (width_key, width), heads = vision_width(vision), getattr(vision, "num_heads", None)
    if width and heads and (width % heads or (width // heads) % 4):
        raise ConfigError(
            f"{where}: {width_key} {width} / num_heads {heads} must be a whole head_dim divisible by 4 "
            "(the vision tower's 2-D rotary embedding)"
        )
    out_key, out = merger_output(vision)
    if out is not None and text_hidden is not None and out != text_hidden:
        raise ConfigError(
            f"{where}.{out_key} {out} must equal text_config.hidden_size {text_hidden} (the vision "
            "merger writes image features into the text model's embedding)"
        )


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


def check_models(configs: dict, processor) -> None:
    """Model/tokenizer/processor agreement, before any weights are loaded. ``configs``: role → config."""
    tokenizer = processor.tokenizer
    ids = special_token_ids(tokenizer)
    image = processor.image_processor
    for role, cfg in configs.items():
        where = f"config.models.{role}"
        if vocab_size(cfg) < len(tokenizer):
            raise ConfigError(f"{where}: vocabulary {vocab_size(cfg)} is smaller than the tokenizer's {len(tokenizer)}")
        if getattr(cfg, "image_token_id", ids["image_token_id"]) != ids["image_token_id"]:
            raise ConfigError(
                f"{where}: image_token_id {cfg.image_token_id} is not the tokenizer's <|image_pad|> "
                f"id {ids['image_token_id']}"
            )
        vision = getattr(cfg, "vision_config", None)
        for key, attr in (
            ("patch_size", "patch_size"),
            ("spatial_merge_size", "merge_size"),
            ("temporal_patch_size", "temporal_patch_size"),
        ):
            mine, theirs = getattr(vision, key, None), getattr(image, attr, None)
            if mine is not None and theirs is not None and int(mine) != int(theirs):
                raise ConfigError(
                    f"{where}: vision_config.{key}={mine} differs from the image processor's {attr}={theirs}"
                )
    if "teacher" in configs and vocab_size(configs["teacher"]) < vocab_size(configs["student"]):
        raise ConfigError(
            f"config.models.teacher: vocabulary {vocab_size(configs['teacher'])} is smaller than the "
            f"student's {vocab_size(configs['student'])}; the teacher must cover every student token"
        )


def check_patch(spec: ModelSpec, cfg, where: str) -> None:
    """The patch's own checks of this model config (``clinkd.patch.check_patchable``: head_dim of the
    fused attention, mrope sections, ...) and of the installed transformers, before anything runs;
    ConfigError naming ``where.patch``."""
    if spec.patch is None:
        return
    from clinkd.patch import check_patchable, check_transformers_version

    try:
        check_transformers_version()
        check_patchable(cfg, **spec.patch.options())
    except RuntimeError as e:  # a transformers outside the supported window
        raise ConfigError(f"{where}.patch: {e}") from None
    except (TypeError, ValueError) as e:
        message = str(e).replace("patch with attention=False", f"set {where}.patch.attention: false")
        raise ConfigError(f"{where}.patch: {message}") from None


def check_lora(config: RunConfig, cfg) -> None:
    """The LoRA settings of the run and its stages: peft installed, every target a linear layer of the
    student's text decoder (on the model built on the meta device). ConfigError naming the key."""
    specs = ([("config.lora", config.lora)] if config.lora is not None else []) + [
        (stage.lora_key, stage.lora) for stage in config.stages if stage.lora is not None
    ]
    if not specs:
        return
    from transformers import AutoModelForImageTextToText

    from .lora import decoder_linears, peft_problem, target_problem

    problem = peft_problem()
    if problem is not None:
        raise ConfigError(f"{specs[0][0]}: {problem}")
    with quiet(), torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    try:
        _, names = decoder_linears(model)
    except (TypeError, AttributeError) as e:
        raise ConfigError(f"{specs[0][0]}: {e}") from None
    for key, spec in specs:
        problem = target_problem(spec, names)
        if problem is not None:
            raise ConfigError(f"{key}.target_modules: {problem}")


def check_topk(config: RunConfig, student_vocab: int) -> None:
    """Each kd stage's topk fits the student's vocabulary."""
    for i, stage in enumerate(config.stages):
        if isinstance(stage, KDStage) and stage.topk is not None and stage.topk > student_vocab:
            raise ConfigError(f"config.stages[{i}].topk={stage.topk} exceeds the student's vocabulary {student_vocab}")


def check_similarity(stage: RCTStage, where: str) -> None:
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


def check_startable(config: RunConfig, state, resume: bool) -> None:
    """An rct stage runs in one process; without ``resume`` the output folder holds no stage yet."""
    if state.num_processes > 1 and any(isinstance(s, RCTStage) for s in config.stages):
        raise ConfigError(
            f"the rct stage runs in one process; this run has {state.num_processes} (train the kd and "
            "sft stages distributed, then the rct stage alone)"
        )
    out = Path(config.output_dir)
    existing = [s.name for s in config.stages if (out / s.name).exists()]
    if not resume and existing:
        raise ConfigError(f"{out} already holds stage folders {existing}; resume the run or use another output_dir")


__all__ = [
    "check_architecture",
    "check_buildable",
    "check_deepspeed",
    "check_lora",
    "check_lora_engine",
    "check_loggers",
    "check_models",
    "check_optimizer_and_schedule",
    "check_output_paths",
    "check_patch",
    "check_rotary_geometry",
    "check_similarity",
    "check_startable",
    "check_topk",
    "check_training_arguments",
    "check_vision_tower",
    "deepspeed_zero",
    "quiet",
]
