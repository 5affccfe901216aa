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

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..data.collate import Qwen2VLCollator
from ..data.dataset import ClinKDDataset
from ..data.encode import SampleEncoder
from ..data.offline_processor import special_token_ids
from ..data.records import load_records
from .arguments import distributed_state, forget_own_state, training_arguments
from .artifacts import (
    STAGE_RECORD,
    build_processor,
    check_existing_store,
    ensure_store,
    read_result,
    store_meta,
    write_patch_record,
    write_result,
)
from .checks import (
    check_architecture,
    check_buildable,
    check_lora,
    check_models,
    check_output_paths,
    check_patch,
    check_similarity,
    check_startable,
    check_topk,
    check_training_arguments,
    quiet,
)
from .errors import ConfigError
from .models import build_model, model_config, vocab_size
from .specs import KDStage, RCTStage, RunConfig, StageSpec


@dataclass
class PreparedRun:
    """What ``prepare_run`` checked and built: the processor, the data set (every record checked),
    the collator, and the model configs (role → transformers config; no weights loaded yet)."""

    config: RunConfig
    processor: object
    dataset: ClinKDDataset
    collator: Qwen2VLCollator
    model_configs: dict


def prepare_run(config: RunConfig, *, progress: bool = False) -> PreparedRun:
    """Every check that does not need weights, in the order of their cost: output folders; each stage's
    training arguments, optimizer and schedule; every record (tasks, boxes, modalities, images); the
    processor; the model configs (shape rules, built on the meta device), model/tokenizer agreement,
    teacher vocabulary, the patch; every sample's encoding (images readable, supervised tokens after
    truncation); existing stores' metadata. ``clinkd check`` and ``clinkd train`` both run it first."""
    check_output_paths(config)
    with quiet():
        check_training_arguments(config)
    records = load_records(config.data.train, root=config.data.root, check_images=True)
    processor = build_processor(config, records)
    roles = ["student"] + (
        ["teacher"] if config.teacher is not None and any(isinstance(s, KDStage) for s in config.stages) else []
    )
    with quiet():
        configs = {
            role: model_config(config.models[role], processor.tokenizer, f"config.models.{role}") for role in roles
        }
        for role, cfg in configs.items():
            spec = config.models[role]
            where = f"config.models.{role}" + (
                ".config" if spec.config is not None else f" (the config of {spec.from_pretrained})"
            )
            check_architecture(cfg, where)
            check_buildable(cfg, where)
    check_models(configs, processor)
    for role, cfg in configs.items():
        check_patch(config.models[role], cfg, f"config.models.{role}")
    check_lora(config, configs["student"])
    for i, stage in enumerate(config.stages):
        if isinstance(stage, RCTStage):
            check_similarity(stage, f"config.stages[{i}]")
    student_vocab = vocab_size(configs["student"])
    check_topk(config, student_vocab)
    try:
        encoder = SampleEncoder(processor, max_length=config.data.max_length)
    except ValueError as e:
        raise ConfigError(f"config.processor: {e}") from None
    dataset = ClinKDDataset(records, encoder)
    dataset.validate(progress=progress)
    for stage in config.stages:
        if isinstance(stage, KDStage) and stage.teacher == "store":
            check_existing_store(config, stage, store_meta(config, stage, processor, student_vocab))
    ids = special_token_ids(processor.tokenizer)
    collator = Qwen2VLCollator(
        pad_token_id=ids["pad_token_id"],
        image_token_id=ids["image_token_id"],
        pad_to_multiple_of=config.data.pad_to_multiple_of,
        packing=config.data.packing,
    )
    return PreparedRun(config, processor, dataset, collator, configs)


def train_and_finalise(
    prepared: PreparedRun,
    stage: StageSpec,
    student,
    folder: Path,
    *,
    args,
    dataset,
    resume: bool,
    base: str | None,
    callbacks=None,
    record: str = STAGE_RECORD,
    details: Callable[[float], dict] | None = None,
    **trainer_kw,
) -> tuple[object, dict]:
    """Train ``student`` as ``stage`` says, for every stage type: on ``dataset`` with the TrainingArguments
    ``args`` (in ``folder``), LoRA adapters on it when the stage has LoRA settings (their base: the folder
    ``base`` it was loaded from); resumed from ``folder``'s last checkpoint. Then ``folder/final`` (the
    model, the processor and the patch record; for LoRA, ``folder/adapter`` and the merged weights) and
    ``folder/record`` (the result {"final", "log_history", **details(training seconds)}), and every process
    waits for them. ``trainer_kw``: ClinKDTrainer's kd, teacher, store. Returns (the trained student, the
    result); the student is None after a DeepSpeed or FSDP stage: its parameters are the engine's shards,
    held by the engine's hooks, so the next stage loads ``final`` rather than wrap that module again."""
    from transformers.trainer_utils import get_last_checkpoint

    from .trainer import ClinKDTrainer

    config = prepared.config
    model = student
    if stage.lora is not None:  # the patched student wrapped with LoRA adapters (clinkd.train.lora)
        from .lora import wrap_lora

        model = wrap_lora(student, stage.lora, base=base)
    trainer = ClinKDTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=prepared.collator,
        processing_class=prepared.processor,
        callbacks=callbacks,
        kernel_backend=config.student.kernel_backend,
        **trainer_kw,
    )
    if stage.lora is not None:
        from .lora import check_engine

        index = [s.name for s in config.stages].index(stage.name)
        check_engine(trainer, f"config.stages[{index}] ({stage.name})")
    checkpoint = get_last_checkpoint(str(folder)) if resume and folder.is_dir() else None
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    final = folder / "final"
    result = {
        "final": str(final),
        "log_history": trainer.state.log_history,
        **(details(time.perf_counter() - started) if details is not None else {}),
    }
    if stage.lora is not None:  # the adapter, then the merged weights in final (with the patch record)
        from .lora import save_lora_stage

        student = save_lora_stage(trainer, final, folder / "adapter", patch=config.student.patch)
        result.update(adapter=str(folder / "adapter"), lora=stage.lora.as_dict())
    else:
        trainer.save_model(str(final))
    if trainer.is_world_process_zero():  # the process that saved the model writes what goes with it
        if stage.lora is None:
            write_patch_record(final, config.student.patch)
        write_result(folder / record, result)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        student = None
    return student, result


def run_training(
    config: RunConfig,
    *,
    resume: bool = True,
    progress: bool = True,
    callbacks=None,
    prepared: PreparedRun | None = None,
) -> dict:
    """Run every stage of ``config`` (after ``prepare_run``'s checks). Returns {stage: {"final": path,
    "log_history": [...]}}. ``callbacks``: extra TrainerCallbacks for every stage."""
    state = distributed_state(config)
    try:
        return _train_stages(config, state, resume=resume, progress=progress, callbacks=callbacks, prepared=prepared)
    finally:
        forget_own_state()  # TrainingArguments built after the run are transformers' own again


def _train_stages(config: RunConfig, state, *, resume: bool, progress: bool, callbacks, prepared) -> dict:
    """``run_training`` in the process ``state``."""
    if prepared is None:
        with state.main_process_first():  # the main process builds what is shared (the offline processor)
            prepared = prepare_run(config, progress=progress and state.is_main_process)
    check_startable(config, state, resume)
    teacher = []  # the teacher model, built when a kd stage first needs it, dropped after the last one
    last_kd = max((i for i, s in enumerate(config.stages) if isinstance(s, KDStage)), default=-1)

    def teacher_factory():
        if not teacher:
            teacher.append(build_model(config.teacher, prepared.model_configs["teacher"], seed=config.seed + 1))
        return teacher[0]

    def load_student(path):  # a saved student (an earlier stage's or round's final), or the run's own
        spec = config.student if path is None else config.student.saved(path)
        return build_model(spec, prepared.model_configs["student"], seed=config.seed)

    def stage_arguments(stage, output_dir=None, overrides=None):
        return training_arguments(config, stage, progress=progress, output_dir=output_dir, overrides=overrides)

    student, results = None, {}
    base = config.student.from_pretrained  # the folder the next stage's student comes from (None: random init)
    for index, stage in enumerate(config.stages):
        folder = Path(config.output_dir) / stage.name
        result = read_result(folder / STAGE_RECORD) if resume else None
        if result is not None:  # complete: the next stage loads its final
            student = None
        elif isinstance(stage, RCTStage):
            from .rct_stage import run_rct_stage

            student, result = run_rct_stage(
                prepared,
                stage,
                student,
                load_student=load_student,
                training_arguments=stage_arguments,
                train=train_and_finalise,
                resume=resume,
                progress=progress,
                callbacks=callbacks,
                base=base,
            )
            if state.is_main_process:
                write_result(folder / STAGE_RECORD, result)
            state.wait_for_everyone()
        else:
            if student is None:  # before the teacher, whose seeding sets the random state LoRA adapters start from
                student = load_student(base)
            trainer_kw = _teacher_inputs(prepared, stage, state, teacher_factory, progress=progress)
            student, result = train_and_finalise(
                prepared,
                stage,
                student,
                folder,
                args=stage_arguments(stage),
                dataset=prepared.dataset,
                resume=resume,
                base=base,
                callbacks=callbacks,
                **trainer_kw,
            )
        if index >= last_kd:
            teacher.clear()  # no later kd stage: free its memory
        results[stage.name] = result
        base = result.get("final", str(folder / "final"))
    return results


def _teacher_inputs(prepared: PreparedRun, stage, state, teacher_factory, *, progress: bool) -> dict:
    """The trainer keywords of a kd stage (its KD settings and its teacher: the store, built by the main
    process first, or the online model); {} for another stage."""
    if not isinstance(stage, KDStage):
        return {}
    if stage.teacher != "store":
        return {"kd": stage.settings(), "teacher": teacher_factory()}
    with state.main_process_first():  # built by the main process; the others open it after
        store = ensure_store(prepared, stage, teacher_factory, progress=progress and state.is_main_process)
    return {"kd": stage.settings(), "store": store}


__all__ = ["PreparedRun", "prepare_run", "run_training", "train_and_finalise"]
