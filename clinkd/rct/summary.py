"""What a correction round did, per task: ``summarise(lines)`` and its Markdown table.

    summary = summarise(lines)        # {"tasks": {task: {...}}, "all": {...}, "similarity_model": ...}

Per task: ``checked`` questions, ``wrong`` answers, ``by_candidate`` (a passing candidate was selected),
``by_ground_truth`` (none passed: the ground truth is kept), ``wrong_score`` (the mean over the wrong
answers of their mean component score, ``clinkd.rct.scoring.mean_score``), and over the answers
corrected by a candidate: ``answer_score`` (their wrong answer's) and ``selected_score`` (the selected
candidate's) — ``gain`` is the difference, what SASG's choice adds over the model's first answer.
"""

from __future__ import annotations

from .scoring import mean_score


def _mean(values):
    return sum(values) / len(values) if values else None


def _group(lines: list[dict]) -> dict:
    wrong = [line for line in lines if line["wrong"]]
    fixed = [line for line in wrong if line["choice"] == "candidate"]
    answer = _mean([mean_score(line["scores"]) for line in fixed])
    selected = _mean([mean_score(line["candidates"][line["chosen_index"]]["scores"]) for line in fixed])
    return {
        "checked": len(lines),
        "wrong": len(wrong),
        "by_candidate": len(fixed),
        "by_ground_truth": sum(line["choice"] == "ground_truth" for line in wrong),
        "wrong_score": _mean([mean_score(line["scores"]) for line in wrong]),
        "answer_score": answer,
        "selected_score": selected,
        "gain": None if answer is None else selected - answer,
    }


def summarise(lines: list[dict]) -> dict:
    tasks = sorted({line["task"] for line in lines})
    return {
        "tasks": {task: _group([line for line in lines if line["task"] == task]) for task in tasks},
        "all": _group(lines),
        "similarity_model": sorted({line["similarity_model"] for line in lines}),
    }


def _cell(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def summary_table(summary: dict) -> str:
    """A Markdown table of ``summarise``'s result, one row per task and one for all of them."""
    columns = ("checked", "wrong", "by_candidate", "by_ground_truth", "answer_score", "selected_score", "gain")
    head = (
        "task",
        "checked",
        "wrong",
        "corrected by a candidate",
        "kept the ground truth",
        "wrong answer's score",
        "selected candidate's score",
        "gain",
    )
    rows = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for task, group in [*summary["tasks"].items(), ("all", summary["all"])]:
        rows.append(f"| {task} | " + " | ".join(_cell(group[c]) for c in columns) + " |")
    return "\n".join(rows)
