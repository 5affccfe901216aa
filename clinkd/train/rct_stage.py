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
``run_rct_stage``; what it needs from the run (the training arguments, loading a saved student, and
``train_and_finalise``, which trains and saves every stage's model and each round's) it passes in, so
this module never imports it.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..data.dataset import ClinKDDataset
from .artifacts import read_result
from .specs import RCTStage

ROUND_RECORD = "round.json"  # in a round's folder once the round is complete


def round_details(r: int, lines: list[dict], stats: dict, training_records: int, correcting: float):
    """What round ``r``'s result adds to a trained stage's (``details`` of ``train_and_finalise``): a function
    of the round's training seconds. ``lines``: the round's corrections; ``correcting``: their seconds."""
    from clinkd.rct.summary import summarise

    def details(training: float) -> dict:
        return {
            "round": r,
            "training_records": training_records,
            "stats": stats,
            "timings_s": {"correction": round(correcting, 3), "training": round(training, 3)},
            "summary": summarise(lines),
        }

    return details


def run_rct_stage(
    prepared,
    stage: RCTStage,
    student,
    *,
    load_student,
    training_arguments,
    train,
    resume: bool,
    progress: bool,
    callbacks=None,
    similarity=None,
    base=None,
) -> tuple[object, dict]:
    """Run (or resume) the rounds of ``stage`` → (the student after the last round, the stage result
    {"final", "log_history", "rounds": [round.json of each]}).

    student: the student model, or None to ``load_student(path)`` it from ``base`` (the previous stage's
    ``final``; None: the run's own student); training_arguments(stage, output_dir, overrides) →
    TrainingArguments; train: ``clinkd.train.run.train_and_finalise``; similarity: a
    ``clinkd.rct.similarity.Similarity`` (default: the stage's); base: also what a LoRA adapter records."""
    from clinkd.rct.round import apply_corrections, correction_round
    from clinkd.rct.similarity import load_similarity

    config, settings = prepared.config, stage.rct
    stage_dir = Path(config.output_dir) / stage.name
    records = prepared.dataset.records
    similarity = similarity or load_similarity(settings.similarity)
    rounds, previous_final = [], base
    for r in range(1, settings.rounds + 1):
        folder = stage_dir / f"round-{r}"
        done = read_result(folder / ROUND_RECORD) if resume else None
        if done is not None:
            rounds.append(done)
            previous_final, student = done["final"], None
            continue
        if student is None:
            student = load_student(previous_final)
        started = time.perf_counter()
        lines, stats = correction_round(
            student,
            prepared.processor,
            records,
            settings,
            similarity,
            folder,
            round_index=r,
            seed=config.seed,
            max_length=config.data.max_length,
            progress=progress,
        )
        corrected = ClinKDDataset(apply_corrections(records, lines, mode=settings.mode), prepared.dataset.encoder)
        correcting = time.perf_counter() - started
        overrides = (
            {"num_train_epochs": 1, "max_steps": -1} if settings.every == "epoch" else {"max_steps": settings.steps}
        )
        args = training_arguments(stage, str(folder), overrides)
        details = round_details(r, lines, stats, len(corrected), correcting)
        student, result = train(
            prepared,
            stage,
            student,
            folder,
            args=args,
            dataset=corrected,
            resume=resume,
            base=previous_final,
            callbacks=callbacks,
            record=ROUND_RECORD,
            details=details,
        )
        rounds.append(result)
        previous_final = result["final"]
    return student, {"final": rounds[-1]["final"], "log_history": _stage_history(rounds), "rounds": rounds}


def _stage_history(rounds: list[dict]) -> list[dict]:
    """The rounds' log histories as one: each round's steps continue the previous round's, and each
    logged step names its ``rct_round``."""
    history, offset = [], 0
    for result in rounds:
        steps = [int(e["step"]) for e in result["log_history"] if "step" in e]
        history += [
            dict(e, step=offset + int(e["step"]), rct_round=result["round"]) if "step" in e else dict(e)
            for e in result["log_history"]
        ]
        offset += max(steps, default=0)
    return history
