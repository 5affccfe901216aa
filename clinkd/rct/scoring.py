"""Is an answer wrong, and which correction candidate is best (Semantic-Aware Selective Generation).

Each answer gets the score components its ground truth calls for, each in [0, 1] (similarity may be
below 0 for an embedding model), and is judged by the task's own rule:

    component    when                                   wrong when
    iou          the ground truth names a box           box score <= iou_threshold (0 with no box)
    words        ROC                                    a ground-truth word is missing (Med-GRIT rule)
    similarity   the ground truth has text besides      similarity < similarity_threshold (τ);
                 its boxes (ROC, RC, MIA)               judged for RC and MIA only

VG is judged by ``iou`` alone, ROC by ``words`` (its similarity only ranks candidates), RC and MIA by
``similarity`` and, when the ground truth is grounded, by ``iou`` as well.

Box score with several boxes: the predicted and ground-truth boxes are matched one to one so that the
sum of IoUs is largest (``scipy.optimize.linear_sum_assignment``), and the sum is divided by the larger
of the two counts. A missing box and an extra box both cost one box's worth; with one box on each side
it is their IoU; no predicted box scores 0. Boxes are read as the metrics read them
(``clinkd.eval.metrics.parse_boxes``: either corner order, Qwen2-VL's 0..1000 grid).

Selection: a candidate passes when none of its judged components is wrong and its text can be a
training target (its boxes well formed, no chat control tokens); among the passing candidates the one
with the highest mean of all its components wins (the earliest on a tie); with none passing the
ground truth is kept. The thresholds are ``Thresholds`` (docs/method.md says why these values).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from clinkd.data.records import CONTROL_TOKENS, DataError, parse_boxes
from clinkd.eval.metrics import CORNERS, TAGS, box_iou, roc_correct, tokenize
from clinkd.eval.metrics import parse_boxes as boxes

_BOX_SPAN = re.compile(r"<\|?box_start\|?>.*?<\|?box_end\|?>|<box>.*?</box>|" + CORNERS.pattern, re.S)


@dataclass(frozen=True)
class Thresholds:
    """similarity: τ, an RC/MIA answer below it is wrong and a candidate needs at least it; iou: a grounded
    answer at or below it is wrong and a candidate needs more (Med-GRIT's Recall@0.5 rule)."""

    similarity: float = 0.9
    iou: float = 0.5

    def __post_init__(self):
        for name in ("similarity", "iou"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} threshold must be a number in [0, 1], got {value!r}")


def box_score(answer: str, reference: str) -> float | None:
    """Matched IoU of the answer's boxes with the reference's (see the module docstring); None when the
    reference names no box."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    ref, pred = boxes(reference), boxes(answer)
    if not ref:
        return None
    if not pred:
        return 0.0
    iou = np.array([[box_iou(p, r) for r in ref] for p in pred])
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum() / max(len(ref), len(pred)))


def text_part(text: str) -> str:
    """``text`` without its boxes and tags, whitespace collapsed: what similarity compares."""
    return " ".join(TAGS.sub(" ", _BOX_SPAN.sub(" ", text)).split())


def components(task: str, reference: str) -> tuple[str, ...]:
    """The score components an answer to ``reference`` gets (module docstring's table)."""
    out = []
    if boxes(reference):
        out.append("iou")
    if task == "ROC":
        out.append("words")
    if tokenize(text_part(reference)):
        out.append("similarity")
    return tuple(out)


def judged(task: str, reference: str) -> tuple[str, ...]:
    """The components that decide whether an answer is wrong."""
    have = components(task, reference)
    if task == "VG":
        return tuple(c for c in have if c == "iou") or ("iou",)
    if task == "ROC":
        return ("words",)
    return tuple(c for c in have if c in ("iou", "similarity"))


def score_answers(tasks: list[str], answers: list[str], references: list[str], similarity) -> list[dict]:
    """{component: score} of each answer (one similarity call for all the pairs that need it)."""
    out, pairs = [], []
    for i, (task, answer, reference) in enumerate(zip(tasks, answers, references, strict=True)):
        have = components(task, reference)
        scores = {}
        if "iou" in have:
            scores["iou"] = box_score(answer, reference)
        if "words" in have:
            scores["words"] = 1.0 if roc_correct(answer, reference) else 0.0
        if "similarity" in have:
            pairs.append(i)
        out.append(scores)
    if pairs:
        values = similarity([text_part(answers[i]) for i in pairs], [text_part(references[i]) for i in pairs])
        for i, value in zip(pairs, values.tolist()):
            out[i]["similarity"] = float(value)
    if any(task == "VG" and "iou" not in s for task, s in zip(tasks, out)):
        raise ValueError("a VG ground truth must name a box")
    return out


def problems(task: str, reference: str, scores: dict, thresholds: Thresholds) -> list[str]:
    """Why an answer with these scores is wrong ([] = right), one phrase per failed judged component."""
    out = []
    for name in judged(task, reference):
        value = scores.get(name)
        if name == "iou" and (value is None or value <= thresholds.iou):
            out.append(f"box score {0.0 if value is None else value:.3f} <= {thresholds.iou}")
        elif name == "words" and value < 1.0:
            out.append("a ground-truth word is missing")
        elif name == "similarity" and value < thresholds.similarity:
            out.append(f"similarity {value:.3f} < {thresholds.similarity}")
    return out


def target_problem(text: str) -> str | None:
    """Why ``text`` cannot be a training answer (empty, a chat control token, a malformed box), or None."""
    if not text.strip():
        return "empty answer"
    token = next((t for t in CONTROL_TOKENS if t in text), None)
    if token is not None:
        return f"holds the control token {token}"
    try:
        parse_boxes(text)
    except DataError as e:
        return f"not a valid answer: {e}"
    return None


def mean_score(scores: dict) -> float:
    values = [v for v in scores.values() if v is not None]
    return sum(values) / len(values) if values else 0.0


def select(task: str, reference: str, candidates: list[str], scores: list[dict], thresholds: Thresholds) -> dict:
    """SASG's choice among ``candidates`` (module docstring): {"choice": "candidate" | "ground_truth",
    "index": i | None, "text": the selected answer, "why": ..., "passes": [bool per candidate],
    "reasons": [[why each candidate fails]]}."""
    reasons = []
    for text, s in zip(candidates, scores, strict=True):
        why = problems(task, reference, s, thresholds)
        bad = target_problem(text)
        reasons.append(why + ([bad] if bad else []))
    passing = [i for i, r in enumerate(reasons) if not r]
    result = {"passes": [not r for r in reasons], "reasons": reasons}
    if not passing:
        return {
            **result,
            "choice": "ground_truth",
            "index": None,
            "text": reference,
            "why": f"none of the {len(candidates)} candidates passes the thresholds",
        }
    best = max(passing, key=lambda i: (mean_score(scores[i]), -i))
    return {
        **result,
        "choice": "candidate",
        "index": best,
        "text": candidates[best],
        "why": f"candidate {best} has the best mean score {mean_score(scores[best]):.3f} of the {len(passing)} passing",
    }
