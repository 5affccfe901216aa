"""One correction round of RCT: find the wrong answers, reflect, select (SASG), write the corrections.

    lines = correction_round(model, processor, records, settings, similarity, "run/rct/round-1",
                             round_index=1, seed=42)
    corrected = apply_corrections(records, lines, mode="replace")     # the round's training records

The round's questions (every turn of every record, or ``settings.sample`` of them) are cut into
batches of ``settings.batch_size`` in a fixed order. For each batch:

1. greedy answers, one batched ``generate()`` with the KV cache (``clinkd.eval.predict.generate_texts``:
   the patched model, so MCG-RoPE positions and the fused prefill), question t asked after the reference
   answers of turns 0..t-1;
2. each answer scored against its ground truth and judged (``clinkd.rct.scoring``);
3. for the wrong ones, ``settings.candidates`` sampled answers (``num_return_sequences``) to the
   reflection prompt (the template filled with the question, the wrong answer and the ground truth, in
   place of the question), torch's generator seeded from (seed, round, batch) so a batch samples the same
   candidates whether or not the round was interrupted before it;
4. every candidate scored, the best passing one or the ground truth selected;
5. the batch's lines appended to ``corrections.partial.jsonl`` as one JSON line, flushed and fsynced.

A killed round resumes from that journal: finished batches are read back, not generated again (a torn
last line is dropped); the journal's first line binds it to the round, its settings, the similarity
model, the seed and the questions, and a journal of other settings is an error, not a mix. When every
batch is done the lines go to ``corrections.jsonl`` (atomically) and the journal is removed.

One line per question (JSON): id, turn, task, modality, round, question, ground_truth, answer, scores,
wrong, reasons, candidates ([{text, scores, passes, reasons}], wrong answers only), choice ("candidate",
"ground_truth" or null for a right answer), chosen_index, selected (the answer trained on next), why,
similarity_model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from pathlib import Path

import torch

from clinkd.data.encode import SampleEncoder
from clinkd.data.records import Record, normalise_boxes
from clinkd.eval.predict import generate_texts
from clinkd.io import write_text_atomic

from .scoring import problems, score_answers, select
from .settings import RCTSettings, fill_template

JOURNAL = "corrections.partial.jsonl"
CORRECTIONS = "corrections.jsonl"


class RCTError(ValueError):
    """A round's files do not belong to this run (another round, settings or data set)."""


def round_questions(
    records: list[Record], settings: RCTSettings, *, seed: int, round_index: int
) -> list[tuple[int, int]]:
    """(record index, turn) of the questions a round checks, in data order: all, or a sample drawn with
    (seed, round) — a count, or a fraction of all the questions (at least one)."""
    every = [(i, t) for i, record in enumerate(records) for t in range(len(record.turns))]
    if settings.sample is None:
        return every
    n = settings.sample if isinstance(settings.sample, int) else max(1, round(settings.sample * len(every)))
    if n >= len(every):
        return every
    chosen = random.Random(f"clinkd-rct:{seed}:{round_index}").sample(range(len(every)), n)
    return [every[i] for i in sorted(chosen)]


def _header(records, questions, settings: RCTSettings, similarity_name: str, *, seed: int, round_index: int) -> dict:
    keys = json.dumps([[records[i].id, t, records[i].turns[t][1]] for i, t in questions]).encode()
    return {
        "round": round_index,
        "seed": seed,
        "similarity_model": similarity_name,
        "settings": settings.describe(),
        "questions": len(questions),
        "questions_sha256": hashlib.sha256(keys).hexdigest(),
    }


def _read_journal(path: Path, header: dict) -> dict[int, dict]:
    """{batch index: its journal entry} of the finished batches in ``path`` (a torn last line dropped);
    RCTError when the journal was written for another round, settings, model or questions."""
    entries, good = {}, []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete = lines[:-1]  # the part after the last newline is a torn write (or empty)
    for n, line in enumerate(complete):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if n == len(complete) - 1:
                break  # the last line was cut mid-write
            raise RCTError(f"{path}:{n + 1} is not a journal line; delete {path} to run the round again") from None
        if n == 0:
            if entry.get("header") != header:
                raise RCTError(
                    f"{path} was written by another round (its settings, similarity model, seed or "
                    f"questions differ: {json.dumps(entry.get('header'))[:200]}); restore them, or "
                    f"delete {path} to run the round again"
                )
        else:
            entries[int(entry["batch"])] = entry
        good.append(line)
    if not good:
        return {}
    if len(good) != len(complete) or lines[-1]:
        write_text_atomic(path, "".join(line + "\n" for line in good))  # the torn tail cut before appending
    return entries


def _append(path: Path, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _reflection_prompt(encoder: SampleEncoder, record: Record, turn: int, answer: str, template: str) -> dict:
    question, truth = record.turns[turn]
    prompt = fill_template(template, question=question, answer=answer, ground_truth=truth)
    turns = record.turns[:turn] + ((prompt, ""),)
    return encoder.encode_prompt(dataclasses.replace(record, turns=turns), turn)


def _batch_lines(
    model,
    processor,
    encoder,
    records,
    chunk,
    settings: RCTSettings,
    similarity,
    *,
    seed: int,
    round_index: int,
    batch_index: int,
) -> dict:
    """The journal entry of one batch: {"batch", "lines", "stats"} (steps 1-4 of the module docstring)."""
    tokenizer = processor.tokenizer
    started = time.perf_counter()
    texts, answer_tokens = generate_texts(
        model,
        tokenizer,
        [encoder.encode_prompt(records[i], t) for i, t in chunk],
        max_new_tokens=settings.max_new_tokens,
    )
    answers = [t[0] for t in texts]
    tasks = [records[i].task for i, _ in chunk]
    truths = [records[i].turns[t][1] for i, t in chunk]
    t = time.perf_counter()
    scores = score_answers(tasks, answers, truths, similarity)
    reasons = [problems(task, truth, s, settings.thresholds) for task, truth, s in zip(tasks, truths, scores)]
    wrong = [j for j, r in enumerate(reasons) if r]
    scoring = time.perf_counter() - t
    candidate_tokens, candidates = 0, {}
    if wrong:
        torch.manual_seed(_batch_seed(seed, round_index, batch_index))
        prompts = [
            _reflection_prompt(encoder, records[chunk[j][0]], chunk[j][1], answers[j], settings.template) for j in wrong
        ]
        drafts, candidate_tokens = generate_texts(
            model,
            tokenizer,
            prompts,
            max_new_tokens=settings.max_new_tokens,
            num_return_sequences=settings.candidates,
            do_sample=True,
            temperature=settings.temperature,
            top_p=settings.top_p,
        )
        t = time.perf_counter()
        flat = [(j, text) for j, texts_j in zip(wrong, drafts) for text in texts_j]
        flat_scores = score_answers(
            [tasks[j] for j, _ in flat], [text for _, text in flat], [truths[j] for j, _ in flat], similarity
        )
        for n, j in enumerate(wrong):
            mine = slice(n * settings.candidates, (n + 1) * settings.candidates)
            candidates[j] = (drafts[n], flat_scores[mine])
        scoring += time.perf_counter() - t
    lines = [
        _journal_line(
            records[i],
            turn,
            round_index,
            answers[j],
            scores[j],
            reasons[j],
            candidates.get(j),
            settings,
            similarity.name,
        )
        for j, (i, turn) in enumerate(chunk)
    ]
    total = time.perf_counter() - started
    return {
        "batch": batch_index,
        "lines": lines,
        "stats": {
            "answer_tokens": answer_tokens,
            "candidate_tokens": candidate_tokens,
            "generation_s": round(total - scoring, 4),
            "scoring_s": round(scoring, 4),
        },
    }


def _batch_seed(seed: int, round_index: int, batch_index: int) -> int:
    """The sampling seed of one batch's reflections: a hash of (run seed, round, batch), so a resumed
    round draws the same candidates."""
    digest = hashlib.sha256(f"{seed}:{round_index}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _journal_line(
    record,
    turn: int,
    round_index: int,
    answer: str,
    scores: dict,
    reasons: list,
    candidates,
    settings: RCTSettings,
    similarity_name: str,
) -> dict:
    """One question's journal line: its answer and scores and, when the answer is wrong, the scored
    ``candidates`` (drafts, their scores) and the one selected (step 4 of the module docstring)."""
    truth = record.turns[turn][1]
    line = {
        "id": record.id,
        "turn": turn,
        "task": record.task,
        "modality": record.modality,
        "round": round_index,
        "question": record.turns[turn][0],
        "ground_truth": truth,
        "answer": answer,
        "scores": scores,
        "wrong": bool(reasons),
        "reasons": reasons,
        "candidates": [],
        "choice": None,
        "chosen_index": None,
        "selected": truth,
        "why": "the answer is right",
        "similarity_model": similarity_name,
    }
    if candidates is not None:
        drafts, draft_scores = candidates
        choice = select(record.task, truth, drafts, draft_scores, settings.thresholds)
        line["candidates"] = [
            {"text": text, "scores": s, "passes": ok, "reasons": why}
            for text, s, ok, why in zip(drafts, draft_scores, choice["passes"], choice["reasons"])
        ]
        line.update(
            choice=choice["choice"],
            chosen_index=choice["index"],
            why=choice["why"],
            selected=normalise_boxes(choice["text"]),
        )
    return line


def correction_round(
    model,
    processor,
    records: list[Record],
    settings: RCTSettings,
    similarity,
    folder: str | os.PathLike,
    *,
    round_index: int,
    seed: int,
    max_length: int = 2048,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Run (or resume, or read back) round ``round_index`` in ``folder`` → (lines, stats): one line per
    question (module docstring), stats = tokens generated, generation and scoring seconds summed over
    the batches (those of an earlier, interrupted process included) and this call's wall time."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    questions = round_questions(records, settings, seed=seed, round_index=round_index)
    header = _header(records, questions, settings, similarity.name, seed=seed, round_index=round_index)
    done_file, journal = folder / CORRECTIONS, folder / JOURNAL
    started = time.perf_counter()
    batches = [questions[k : k + settings.batch_size] for k in range(0, len(questions), settings.batch_size)]
    if done_file.is_file():
        lines = [json.loads(line) for line in done_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        stats = json.loads((folder / "round_stats.json").read_text(encoding="utf-8"))
        return lines, stats
    entries = _read_journal(journal, header) if journal.is_file() else {}
    if not entries:
        write_text_atomic(journal, json.dumps({"header": header}) + "\n")
    encoder = SampleEncoder(processor, max_length=max_length)
    was_training = model.training
    model.eval()
    try:
        for k, chunk in enumerate(tqdm(batches, desc=f"rct round {round_index}", disable=not progress)):
            if k in entries:
                continue
            entries[k] = _batch_lines(
                model,
                processor,
                encoder,
                records,
                chunk,
                settings,
                similarity,
                seed=seed,
                round_index=round_index,
                batch_index=k,
            )
            _append(journal, entries[k])
    finally:
        model.train(was_training)
    lines = [line for k in range(len(batches)) for line in entries[k]["lines"]]
    stats = {
        key: sum(entries[k]["stats"][key] for k in range(len(batches)))
        for key in ("answer_tokens", "candidate_tokens", "generation_s", "scoring_s")
    }
    stats["wall_s"] = round(time.perf_counter() - started, 3)
    stats["questions"] = len(questions)
    write_text_atomic(folder / "round_stats.json", json.dumps(stats, indent=1))
    write_text_atomic(done_file, "".join(json.dumps(line) + "\n" for line in lines))
    journal.unlink()
    return lines, stats


def apply_corrections(records: list[Record], lines: list[dict], *, mode: str = "replace") -> list[Record]:
    """The next training records: each wrong answer's ``selected`` answer in place of its ground truth
    (``replace``), or a copy of its record with it (id ``<id>~rct<round>``) after the originals (``join``);
    right answers untouched. RCTError when a line does not match its record (unknown id, turn out of
    range, another ground truth): corrections of another data set are never applied."""
    if mode not in ("replace", "join"):
        raise ValueError(f"mode must be 'replace' or 'join', got {mode!r}")
    index = {record.id: i for i, record in enumerate(records)}
    changes: dict[int, dict[int, str]] = {}
    rounds = {}
    for line in lines:
        i = index.get(line.get("id"))
        if i is None:
            raise RCTError(f"correction for id {line.get('id')!r}, which is not in the training data")
        turn = line.get("turn")
        record = records[i]
        if (
            not isinstance(turn, int)
            or not 0 <= turn < len(record.turns)
            or record.turns[turn][1] != line.get("ground_truth")
        ):
            raise RCTError(
                f"correction for {record.id!r} turn {turn!r} does not match the training data (its turn "
                "or ground truth differ)"
            )
        if line.get("wrong"):
            changes.setdefault(i, {})[turn] = line["selected"]
            rounds[i] = line.get("round", 0)
    out = list(records)
    extra = []
    for i, turns in sorted(changes.items()):
        record = records[i]
        new_turns = tuple((q, turns.get(t, a)) for t, (q, a) in enumerate(record.turns))
        if mode == "replace":
            out[i] = dataclasses.replace(record, turns=new_turns)
        else:
            extra.append(dataclasses.replace(record, id=f"{record.id}~rct{rounds[i]}", turns=new_turns))
    return out + extra
