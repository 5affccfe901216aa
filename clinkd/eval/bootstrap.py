"""Confidence intervals of Med-GRIT scores: a paired, stratified percentile bootstrap over test questions.

    rows = {name: gather(preds, test)[0] for name, preds in predictions.items()}   # same questions each
    ci = bootstrap_intervals(rows, [("ROC", "Accuracy"), ("MIA", "mBMR")], resamples=1000, seed=0)
    ci["models"]["student"]["MIA"]["mBMR"]                 → {"value": 64.7, "interval": [58.1, 70.9]}
    ci["differences"]["student - control"]["MIA"]["mBMR"]  → {"value": -0.5, "interval": [-4.0, 3.1],
                                                             "clear": False}

Resampling: each of the B resamples draws, inside every (task, modality) group, as many questions as
the group has, with replacement. Stratified, so every modality keeps its size and the macro average
over modalities is formed as on the real test set. Paired: one draw scores every model, so the
difference of two models is bootstrapped on the same questions (narrower than their two intervals
side by side when the models get the same questions right or wrong). Each interval holds the
(1 − c)/2 and (1 + c)/2 percentiles of its B values (c = ``confidence``); a difference is "clear"
when its interval excludes 0. "value" is the score on the test set itself (no resampling).

The corpus metrics (BLEU, CIDEr, METEOR) are recomputed on every resample by the same library calls
the scores come from; VG hits, ROC correctness and ROUGE-L (a mean of per-question scores) are
computed once per question and averaged over each draw, which gives the same numbers for less work.
METEOR statistics are computed once per question too (``MeteorScorer``); only its aggregation runs per draw.
"""

from __future__ import annotations

import itertools

import numpy as np

from . import metrics
from .evaluate import Row, group_rows

_CORPUS = {"BLEU": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "mBMR"), "METEOR": ("METEOR", "mBMR")}  # what needs them


class _Group:
    """One model's questions of one (task, modality): what every draw rescores."""

    def __init__(self, task: str, rows: list[Row]):
        self.task = task
        if task == "VG":
            self.per_question = {"Recall@0.5": np.array([metrics.vg_hit(r.response, r.reference) for r in rows], float)}
        elif task == "ROC":
            self.per_question = {
                "Accuracy": np.array([metrics.roc_correct(r.response, r.reference) for r in rows], float)
            }
        else:
            self.hyps = [" ".join(metrics.tokenize(r.response)) for r in rows]
            self.refs = [[" ".join(metrics.tokenize(r.reference))] for r in rows]
            self.per_question = {"ROUGE-L": metrics.rouge_l_per_sample(self.hyps, self.refs)}

    def scores(self, draw: np.ndarray, names: set[str], meteor_scorer) -> dict:
        """{metric: value ×100} of the questions ``draw`` picks (indices, repeats allowed)."""
        out = {name: float(values[draw].mean()) for name, values in self.per_question.items()}
        if self.task in ("RC", "MIA"):
            hyps, refs = [self.hyps[i] for i in draw], [self.refs[i] for i in draw]
            if names & set(_CORPUS["BLEU"]):
                out.update({f"BLEU-{k + 1}": v for k, v in enumerate(metrics.bleu(hyps, refs))})
            if "CIDEr" in names:
                out["CIDEr"] = metrics.cider(hyps, refs)
            if names & set(_CORPUS["METEOR"]):
                out["METEOR"] = None if meteor_scorer is None else metrics.meteor(hyps, refs, meteor_scorer)
            if "mBMR" in names:
                out["mBMR"] = metrics.mbmr(out)
        return {name: None if out.get(name) is None else 100.0 * out[name] for name in names}


def _paired_groups(rows_by_model: dict[str, list[Row]]) -> dict[tuple[str, str], dict[str, list[Row]]]:
    """{(task, modality): {model: rows in one question order}}; ValueError unless every model answered
    the same questions."""
    names = list(rows_by_model)
    keyed = {name: {row.key: row for row in rows} for name, rows in rows_by_model.items()}
    first = keyed[names[0]]
    for name in names[1:]:
        if keyed[name].keys() != first.keys():
            extra = sorted(keyed[name].keys() ^ first.keys())[:3]
            raise ValueError(
                f"the predictions of {name!r} and {names[0]!r} cover different questions "
                f"(e.g. {extra}): a paired bootstrap needs the same ones"
            )
    out = {}
    for group, rows in group_rows(rows_by_model[names[0]]).items():
        out[group] = {name: [keyed[name][row.key] for row in rows] for name in names}
    return out


def _macro(per_modality: list[float | None]) -> float | None:
    return None if any(v is None for v in per_modality) else sum(per_modality) / len(per_modality)


def percentile_interval(values: np.ndarray | None, confidence: float) -> list[float] | None:
    """The central ``confidence`` percentile interval of resampled ``values`` (None for None)."""
    if values is None:
        return None
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return [float(low), float(high)]


class Resampled:
    """The point scores and the B resampled scores of every model: ``point[model][task][metric]`` and
    ``samples[(model, task, metric)]`` (an array of B values, or None where a draw had no score).
    Resampled with the same seed over the same questions, two calls draw the same questions in every
    resample: their samples can be combined (averaged, subtracted) draw by draw."""

    def __init__(self, point: dict, samples: dict, wanted: dict[str, set[str]], tasks: list[str], resamples: int):
        self.point, self.samples, self.wanted, self.tasks, self.resamples = point, samples, wanted, tasks, resamples


def bootstrap_samples(
    rows_by_model: dict[str, list[Row]], columns, *, resamples: int = 1000, seed: int = 0, meteor_scorer=None
) -> Resampled:
    """The resampled macro scores ``columns`` of every model (``bootstrap_intervals`` without the
    intervals). Arguments as ``bootstrap_intervals``."""
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    paired = _paired_groups(rows_by_model)
    names = list(rows_by_model)
    wanted: dict[str, set[str]] = {}
    for task, metric in columns:
        wanted.setdefault(task, set()).add(metric)
    groups = {
        key: {name: _Group(key[0], rows) for name, rows in by_model.items()}
        for key, by_model in paired.items()
        if key[0] in wanted
    }
    tasks = list(dict.fromkeys(task for task, _ in groups))

    def macro_scores(draws: dict) -> dict:
        """{model: {task: {metric: macro value}}} for one draw per group."""
        out = {}
        for name in names:
            per = {}
            for key, by_model in groups.items():
                task = key[0]
                per.setdefault(task, []).append(by_model[name].scores(draws[key], wanted[task], meteor_scorer))
            out[name] = {task: {m: _macro([s[m] for s in per[task]]) for m in wanted[task]} for task in per}
        return out

    point = macro_scores({key: np.arange(len(paired[key][names[0]])) for key in groups})
    rng = np.random.default_rng(seed)
    samples = {(name, task, m): [] for name in names for task in tasks for m in wanted[task]}
    for _ in range(resamples):
        draws = {key: rng.integers(0, len(paired[key][names[0]]), len(paired[key][names[0]])) for key in groups}
        for name, by_task in macro_scores(draws).items():
            for task, by_metric in by_task.items():
                for m, value in by_metric.items():
                    samples[(name, task, m)].append(value)
    arrays = {k: None if any(v is None for v in vs) else np.array(vs) for k, vs in samples.items()}
    return Resampled(point, arrays, {t: wanted[t] for t in tasks}, tasks, resamples)


def bootstrap_intervals(
    rows_by_model: dict[str, list[Row]],
    columns,
    *,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    meteor_scorer=None,
) -> dict:
    """Intervals of the macro scores ``columns`` ((task, metric) pairs) of every model, and of the
    difference of every pair of models (see the module docstring for the method and the output).

    rows_by_model: {model name: ``gather``'s rows}, every model over the same questions.
    meteor_scorer: a running ``metrics.MeteorScorer`` (None: METEOR and mBMR get no interval).
    Tasks absent from the rows are left out. Deterministic for a given ``seed``."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    drawn = bootstrap_samples(rows_by_model, columns, resamples=resamples, seed=seed, meteor_scorer=meteor_scorer)
    point, arrays, tasks, wanted = drawn.point, drawn.samples, drawn.tasks, drawn.wanted
    names = list(rows_by_model)
    models = {
        name: {
            task: {
                m: {"value": point[name][task][m], "interval": percentile_interval(arrays[(name, task, m)], confidence)}
                for m in sorted(wanted[task])
            }
            for task in tasks
        }
        for name in names
    }
    differences = {
        f"{a} - {b}": _difference(a, b, point, arrays, tasks, wanted, confidence)
        for a, b in itertools.combinations(names, 2)
    }
    return {
        "method": "paired stratified percentile bootstrap over test questions",
        "resamples": resamples,
        "confidence": confidence,
        "seed": seed,
        "models": models,
        "differences": differences,
    }


def _difference(a: str, b: str, point: dict, arrays: dict, tasks: list, wanted: dict, confidence: float) -> dict:
    """{task: {metric: {"value", "interval", "clear"}}} of model ``a`` minus model ``b``: the point
    difference, the percentile interval of the paired resampled differences, and whether it excludes 0."""
    block = {}
    for task in tasks:
        block[task] = {}
        for m in sorted(wanted[task]):
            va, vb = arrays[(a, task, m)], arrays[(b, task, m)]
            interval = None if va is None or vb is None else percentile_interval(va - vb, confidence)
            value = None if interval is None else point[a][task][m] - point[b][task][m]
            clear = interval is not None and (interval[0] > 0 or interval[1] < 0)
            block[task][m] = {"value": value, "interval": interval, "clear": clear}
    return block
