"""Score a predictions file against Med-GRIT ground truth, per modality and macro-averaged.

    report = evaluate("preds.jsonl", data="test.jsonl")      # or data=None: truth inside the file

Predictions file (JSONL, one object a line; ``clinkd predict`` writes it):

    {"id": "ct_00042", "turn": 0, "response": "<|box_start|>(0.1,0.2),(0.4,0.5)<|box_end|>",
     "annotation": "...", "task": "VG", "modality": "ct", "question": "..."}

``id`` and ``response`` are required; ``turn`` (default 0) picks the question of a multi-turn record.
With ``data`` the reference answer, task and modality come from the data file's record; without it the
line must carry ``annotation`` and ``task`` (modality: ``modality`` or the id prefix).

Errors (DataError, naming ``file:line``): a malformed JSON line, a missing or mistyped field, an
unknown task or modality, an id (or turn) not in the data, a repeated (id, turn). Data samples with no
prediction are not an error: they are counted in ``report["missing"]`` and left out of the scores.

Scores: each task's metrics are computed on each modality's samples, then averaged over the
modalities that have samples of that task (macro). Values are percentages (CIDEr ×100 as well).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from ..data.records import TASKS, DataError, check_modality, load_records, parse_jsonl, read_text
from . import metrics

SPICE_NOTE = "unavailable: SPICE needs Stanford CoreNLP model downloads"


class Row(NamedTuple):
    """One scored question: its task, modality, the model's response, the reference answer, the
    prediction's ``file:line`` and its (id, turn) key (which pairs rows of two models' predictions)."""

    task: str
    modality: str
    response: str
    reference: str
    where: str
    key: tuple[str, int]


def read_predictions(path: str | os.PathLike) -> list[tuple[dict, str]]:
    """(object, "file:line") for each non-empty line; DataError for a line that is not a JSON object
    with a string ``id`` and a string ``response``."""
    path = Path(path)
    out = []
    for obj, where in parse_jsonl(read_text(path, "predictions file"), path):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: a prediction must be a JSON object, got {type(obj).__name__}")
        for key in ("id", "response"):
            if key not in obj:
                raise DataError(f"{where}: missing field {key!r}")
            if not isinstance(obj[key], str):
                raise DataError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
        turn = obj.get("turn", 0)
        if isinstance(turn, bool) or not isinstance(turn, int) or turn < 0:
            raise DataError(f"{where}: field 'turn' must be a non-negative integer, got {turn!r}")
        out.append((obj, where))
    if not out:
        raise DataError(f"{path}: no predictions")
    return out


def gather(predictions: str | os.PathLike, data: str | os.PathLike | None = None, *, root=None):
    """[Row] in the predictions' order and the number of data samples with no prediction."""
    truth = {}
    if data is not None:
        for record in load_records(data, root=root, check_images=False):  # modality checked there
            for turn, (_question, answer) in enumerate(record.turns):
                truth[(record.id, turn)] = (record.task, record.modality, answer)
    rows, seen = [], {}
    for obj, where in read_predictions(predictions):
        key = (obj["id"], obj.get("turn", 0))
        if key in seen:
            raise DataError(f"{where}: id {key[0]!r} turn {key[1]} repeats the prediction at {seen[key]}")
        seen[key] = where
        if data is not None:
            if key not in truth:
                raise DataError(f"{where}: id {key[0]!r} turn {key[1]} is not in the data file {data}")
            task, modality, reference = truth[key]
        else:
            for field in ("annotation", "task"):
                if not isinstance(obj.get(field), str):
                    raise DataError(f"{where}: missing string field {field!r} (needed without --data)")
            task, reference = obj["task"].upper(), obj["annotation"]
            if task not in TASKS:
                raise DataError(f"{where}: unknown task {obj['task']!r}; expected one of {', '.join(TASKS)}")
            modality = check_modality(obj.get("modality", obj["id"].split("_", 1)[0]), where)
        if task == "VG" and metrics.parse_box(reference) is None:
            raise DataError(f"{where}: the VG reference {reference!r} holds no box")
        rows.append(Row(task, modality, obj["response"], reference, where, key))
    missing = sum(1 for key in truth if key not in seen)
    return rows, missing


def group_scores(task: str, pairs: list[tuple[str, str]], *, with_meteor: bool = True, meteor_scorer=None) -> dict:
    """{metric: value ×100} of one task on [(response, reference)] (one modality's samples)."""
    if task == "VG":
        return {"Recall@0.5": 100.0 * sum(metrics.vg_hit(p, r) for p, r in pairs) / len(pairs)}
    if task == "ROC":
        return {"Accuracy": 100.0 * sum(metrics.roc_correct(p, r) for p, r in pairs) / len(pairs)}
    raw = metrics.caption_metrics(
        [p for p, _ in pairs], [[r] for _, r in pairs], with_meteor=with_meteor, meteor_scorer=meteor_scorer
    )
    return {k: None if v is None else 100.0 * v for k, v in raw.items()}


def macro_average(per_modality: list[dict]) -> dict:
    """{metric: mean over the modalities} (None when any modality has None for it)."""
    out = {}
    for name in (k for k in per_modality[0] if k != "n"):
        values = [v[name] for v in per_modality]
        out[name] = None if any(x is None for x in values) else sum(values) / len(values)
    return out


def group_rows(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    """{(task, modality): rows}, tasks in TASKS order and modalities sorted."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row.task, row.modality)].append(row)
    order = sorted(groups, key=lambda tm: (TASKS.index(tm[0]), tm[1]))
    return {key: groups[key] for key in order}


def score_rows(rows: list[Row], *, with_meteor: bool = True, meteor_scorer=None) -> dict:
    """{task: {"per_modality": {modality: {metric: value, "n": count}}, "macro": {metric: value}}}."""
    out = {}
    for (task, modality), group in group_rows(rows).items():
        scores = group_scores(
            task, [(r.response, r.reference) for r in group], with_meteor=with_meteor, meteor_scorer=meteor_scorer
        )
        out.setdefault(task, {"per_modality": {}})["per_modality"][modality] = {**scores, "n": len(group)}
    for block in out.values():
        block["macro"] = macro_average(list(block["per_modality"].values()))
    return out


def evaluate(predictions, data=None, *, root=None, with_meteor: bool = True, meteor_scorer=None) -> dict:
    """The full report: {"tasks": score_rows(...), "n": predictions scored, "missing": data samples with
    no prediction, "meteor": "available" | "unavailable: …", "spice": "unavailable: …"}.
    ``meteor_scorer``: a running ``metrics.MeteorScorer`` to reuse across calls (its start costs ~15-30 s)."""
    rows, missing = gather(predictions, data, root=root)
    scorer = None
    if with_meteor and meteor_scorer is not None:
        meteor = "available"
        tasks = score_rows(rows, with_meteor=True, meteor_scorer=meteor_scorer)
        return {"tasks": tasks, "n": len(rows), "missing": missing, "meteor": meteor, "spice": SPICE_NOTE}
    if not with_meteor:
        meteor = "not requested"
    elif not metrics.meteor_available():
        meteor, with_meteor = "unavailable: needs pycocoevalcap and a java executable", False
    elif not any(row.task in ("RC", "MIA") for row in rows):
        meteor = "available"
    else:
        try:
            scorer, meteor = metrics.MeteorScorer(), "available"
        except OSError as e:
            meteor, with_meteor = f"unavailable: the METEOR jar did not start ({e})", False
    try:
        tasks = score_rows(rows, with_meteor=with_meteor, meteor_scorer=scorer)
    finally:
        if scorer is not None:
            scorer.close()
    return {"tasks": tasks, "n": len(rows), "missing": missing, "meteor": meteor, "spice": SPICE_NOTE}


def format_report(report: dict) -> str:
    """A markdown summary: one table per task, a row per modality and the macro average."""
    lines = [
        f"{report['n']} predictions scored, {report['missing']} data samples without a prediction; "
        f"METEOR {report['meteor']}; SPICE {report['spice']}.",
        "",
    ]
    for task, block in report["tasks"].items():
        names = list(block["macro"])
        lines += [f"### {task}", "", "| modality | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        for modality, scores in block["per_modality"].items():
            lines.append(f"| {modality} | {scores['n']} | " + " | ".join(fmt(scores[n]) for n in names) + " |")
        lines.append("| **macro** | | " + " | ".join(fmt(block["macro"][n]) for n in names) + " |")
        lines.append("")
    return "\n".join(lines)
