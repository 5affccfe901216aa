"""An rct stage: rounds of correction (``clinkd.rct.round``) and SFT on the corrected data.

Round r (1..rounds) in ``<stage>/round-r/``:

    corrections.jsonl      the round's answers, candidates and choices (journal while it runs)
    round_stats.json       tokens generated, generation / scoring seconds
    checkpoint-N/          the round's Trainer checkpoints (a killed round resumes from the last one)
    final/                 the student after the round (from_pretrained-able, with clinkd_patch.json)
    adapter/               with LoRA settings: the round's adapter (its final: merged weights; clinkd.train.lora)
    round.json             written when the round is complete: its log history, stats and summary

Each round corrects with the current student (the previous stage's, then the previous round's), then
trains it with a Trainer of its own (optimizer and schedule from the stage's training arguments) for
one epoch or ``steps`` steps over the training records with the round's corrections applied. The
stage's result lists the rounds, ``final`` is the last round's model, and its log history runs through
the rounds with continuing step numbers. A LoRA stage trains a fresh adapter in each round, on the
round's starting model, and merges it before the next round corrects. ``run_training`` calls
``run_rct_stage``; what it needs from the run (the training arguments, loading a saved student) it passes
in, so this module never imports it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from clinkd.io import write_bytes_atomic
from clinkd.patch.record import write_patch_record

from ..data.dataset import ClinKDDataset
from .trainer import ClinKDTrainer


def run_rct_stage(prepared, stage, student, *, load_student, training_arguments, resume: bool, progress: bool,
                  callbacks=None, similarity=None, base=None) -> tuple[object, dict]:
    """Run (or resume) the rounds of ``stage`` → (the student after the last round, the stage result
    {"final", "log_history", "rounds": [round.json of each]}).

    student: the student model, or None to ``load_student(path)`` the previous stage's ``final``
    (``prepared.config``'s last complete stage); training_arguments(stage, output_dir, overrides) →
    TrainingArguments; similarity: a ``clinkd.rct.similarity.Similarity`` (default: the stage's); base:
    the folder the stage's student comes from (recorded in a LoRA adapter; None: a random init)."""
    from transformers.trainer_utils import get_last_checkpoint

    from clinkd.rct.round import apply_corrections, correction_round
    from clinkd.rct.similarity import load_similarity
    from clinkd.rct.summary import summarise

    config, settings = prepared.config, stage.rct
    stage_dir = Path(config.output_dir) / stage.name
    records = prepared.dataset.records
    similarity = similarity or load_similarity(settings.similarity)
    rounds, previous_final = [], None
    for r in range(1, settings.rounds + 1):
        folder = stage_dir / f"round-{r}"
        done = folder / "round.json"
        if resume and done.is_file():
            rounds.append(json.loads(done.read_text(encoding="utf-8")))
            previous_final, student = rounds[-1]["final"], None
            continue
        if student is None:
            student = load_student(previous_final)
        started = time.perf_counter()
        lines, stats = correction_round(student, prepared.processor, records, settings, similarity, folder,
                                        round_index=r, seed=config.seed, max_length=config.data.max_length,
                                        progress=progress)
        corrected = ClinKDDataset(apply_corrections(records, lines, mode=settings.mode), prepared.dataset.encoder)
        correcting = time.perf_counter() - started
        overrides = {"num_train_epochs": 1, "max_steps": -1} if settings.every == "epoch" else \
            {"max_steps": settings.steps}
        args = training_arguments(stage, str(folder), overrides)
        model = student
        if stage.lora is not None:
            from .lora import wrap_lora

            model = wrap_lora(student, stage.lora, base=previous_final or base)
        trainer = ClinKDTrainer(model=model, args=args, train_dataset=corrected, data_collator=prepared.collator,
                                processing_class=prepared.processor, callbacks=callbacks,
                                kernel_backend=(config.student.patch or {}).get("backend"))
        if stage.lora is not None:
            from .lora import check_engine

            check_engine(trainer, f"stage {stage.name!r}")
        checkpoint = get_last_checkpoint(str(folder)) if resume else None
        t = time.perf_counter()
        trainer.train(resume_from_checkpoint=checkpoint)
        training = time.perf_counter() - t
        final = folder / "final"
        result = {"round": r, "final": str(final), "log_history": trainer.state.log_history,
                  "training_records": len(corrected), "stats": stats,
                  "timings_s": {"correction": round(correcting, 3), "training": round(training, 3)},
                  "summary": summarise(lines)}
        if stage.lora is not None:
            from .lora import save_lora_stage

            student = save_lora_stage(trainer, final, folder / "adapter", patch=config.student.patch)
            result.update(adapter=str(folder / "adapter"), lora=stage.lora.as_dict())
        else:
            trainer.save_model(str(final))
        if trainer.is_world_process_zero():
            if stage.lora is None:
                write_patch_record(final, config.student.patch)
            write_bytes_atomic(done, json.dumps(result, indent=1).encode())
        trainer.accelerator.wait_for_everyone()
        rounds.append(result)
        previous_final = str(final)
    history, offset = [], 0
    for result in rounds:
        steps = [int(e["step"]) for e in result["log_history"] if "step" in e]
        history += [dict(e, step=offset + int(e["step"]), rct_round=result["round"]) if "step" in e else dict(e)
                    for e in result["log_history"]]
        offset += max(steps, default=0)
    return student, {"final": rounds[-1]["final"], "log_history": history, "rounds": rounds}
