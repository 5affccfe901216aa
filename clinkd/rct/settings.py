"""The settings of an rct stage, each checked where it is made (ValueError naming the key).

    RCTSettings(rounds=2, candidates=4, thresholds=Thresholds(similarity=0.9, iou=0.5))

Per round, ``sample`` training questions (all, a count, or a fraction; drawn with the run's seed and
the round) are answered greedily; each wrong one gets ``candidates`` sampled corrections
(``temperature``, ``top_p``) from ``template`` filled with its question, its wrong answer and the
ground truth; SASG keeps the best passing candidate or the ground truth (``clinkd.rct.scoring``); the
round then trains one epoch (``every: epoch``) or ``steps`` steps (``every: steps``) on the training
data with the selected answers in place of (``mode: replace``) or beside (``mode: join``) the wrong
ones' ground truths. docs/method.md gives the reasons for the defaults.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from clinkd.data.records import CONTROL_TOKENS

from .scoring import Thresholds

DEFAULT_TEMPLATE = (
    "{question}\nYour previous answer was: {answer}\nThe correct answer is: {ground_truth}\n"
    "Write the corrected answer, keeping its boxes."
)
SLOTS = ("question", "answer", "ground_truth")
MODES = ("replace", "join")
EVERY = ("epoch", "steps")


def template_problem(template) -> str | None:
    """What is wrong with a reflection template, or None: it must be a string with a ``{ground_truth}``
    slot, only the slots of SLOTS (``{{``/``}}`` for literal braces) and no chat control token."""
    if not isinstance(template, str):
        return f"must be a string, got {type(template).__name__}"
    try:
        fields = [name for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        return f"is not a format string ({e}); write literal braces as {{{{ and }}}}"
    unknown = sorted({f for f in fields if f not in SLOTS})
    if unknown:
        return f"has unknown slot(s) {', '.join('{' + u + '}' for u in unknown)}; the slots are " + ", ".join(
            "{" + s + "}" for s in SLOTS
        )
    if "ground_truth" not in fields:
        return "has no {ground_truth} slot: the model must be shown the ground truth to correct its answer"
    token = next((t for t in CONTROL_TOKENS if t in template), None)
    if token is not None:
        return f"holds the chat control token {token}"
    return None


def strip_control_tokens(text: str) -> str:
    """``text`` with every chat control token removed (a wrong answer may hold them; in a prompt they
    would open turns or add image placeholders)."""
    for token in CONTROL_TOKENS:
        text = text.replace(token, " ")
    return " ".join(text.split())


def fill_template(template: str, *, question: str, answer: str, ground_truth: str) -> str:
    return template.format(
        question=question, answer=strip_control_tokens(answer) or "(no answer)", ground_truth=ground_truth
    )


def _integer(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _real(name, value, low, high, *, low_open=False):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not ((value > low if low_open else value >= low) and value <= high)
    ):
        raise ValueError(f"{name} must be a number in {'(' if low_open else '['}{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class RCTSettings:
    rounds: int = 2
    every: str = "epoch"
    steps: int | None = None
    sample: int | float | None = None
    batch_size: int = 16
    max_new_tokens: int = 64
    candidates: int = 4
    temperature: float = 0.7
    top_p: float = 0.9
    thresholds: Thresholds = field(default_factory=Thresholds)
    template: str = DEFAULT_TEMPLATE
    mode: str = "replace"
    similarity: dict = field(default_factory=dict)

    def __post_init__(self):
        _integer("rounds", self.rounds, 1)
        if self.every not in EVERY:
            raise ValueError(f"every must be one of {', '.join(EVERY)}, got {self.every!r}")
        if self.every == "steps":
            _integer("steps", self.steps, 1)
        elif self.steps is not None:
            raise ValueError("steps is for every: steps (with every: epoch a round trains one epoch)")
        if self.sample is not None:
            if isinstance(self.sample, float):
                _real("sample", self.sample, 0.0, 1.0, low_open=True)
            else:
                _integer("sample", self.sample, 1)
        _integer("batch_size", self.batch_size, 1)
        _integer("max_new_tokens", self.max_new_tokens, 1)
        _integer("candidates", self.candidates, 1)
        _real("temperature", self.temperature, 0.0, 100.0, low_open=True)
        _real("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        problem = template_problem(self.template)
        if problem is not None:
            raise ValueError(f"template {problem}")

    def describe(self) -> dict:
        """The settings as JSON (bound to each round's journal: a resumed round must use the same ones)."""
        return {
            "every": self.every,
            "steps": self.steps,
            "sample": self.sample,
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "candidates": self.candidates,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "thresholds": {"similarity": self.thresholds.similarity, "iou": self.thresholds.iou},
            "template": self.template,
            "mode": self.mode,
        }
