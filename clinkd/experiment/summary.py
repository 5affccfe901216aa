"""The ablation's numbers: each row's scores across seeds and test questions, and what each part adds.

For a row and a metric (macro over modalities, ×100): the score of each seed's model, their mean and
sample standard deviation (the training noise), and the 95 % interval of the mean over seeds from a
paired, stratified bootstrap over the test questions (``clinkd.eval.bootstrap``): every resample draws
the same questions for every model, each seed's model is scored on it and the scores are averaged.
For a pair of rows (a row and the one it adds a part to, ``rows.ROWS``' parent): the per-seed
differences, their mean and the bootstrap interval of the mean difference. A difference **holds**
when that interval excludes 0 *and* every seed's difference has the mean's sign: it survives both
the test questions and the training seeds.

    report = summarise({0: {"sft": "seed-0/predictions/sft.jsonl", ...}, 1: {...}}, "test.jsonl")
    write_summary(report, "benchmarks/results/ablation")     # ablation.json, ablation.md
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clinkd.io import write_text_atomic

from .rows import EXTRA_PAIRS, ROWS

COLUMNS = (
    ("VG", "Recall@0.5"),
    ("ROC", "Accuracy"),
    ("RC", "BLEU-4"),
    ("RC", "CIDEr"),
    ("MIA", "BLEU-1"),
    ("MIA", "METEOR"),
    ("MIA", "mBMR"),
)
CONFIDENCE = 0.95
# The reference row above the table: the teacher whose pseudo-labels the KD rows learn from.
REFERENCE = ("teacher", "teacher (reference: SFT on teacher.jsonl, stock M-RoPE)")


def pairs() -> list[tuple[str, str]]:
    """(row, row it is compared with): every row against its parent, then ``EXTRA_PAIRS``."""
    out = [(row.name, row.parent) for row in ROWS if row.parent is not None]
    return out + [p for p in EXTRA_PAIRS if p not in out]


def summarise(predictions: dict, test, *, resamples: int = 1000, seed: int = 0, progress: bool = False) -> dict:
    """{"seeds", "rows", "columns", "scores", "differences", "intervals"} from {seed: {row: predictions
    file}} (every seed has every row of ``ROWS``; the teacher's, under ``REFERENCE[0]``, is scored
    when every seed has it)."""
    from clinkd.eval.bootstrap import bootstrap_samples
    from clinkd.eval.evaluate import gather
    from clinkd.eval.metrics import MeteorScorer, meteor_available

    seeds = sorted(predictions)
    reference = all(REFERENCE[0] in predictions[s] for s in seeds)
    names = [row.name for row in ROWS] + ([REFERENCE[0]] if reference else [])
    rows = {f"{name}@{s}": gather(predictions[s][name], test)[0] for s in seeds for name in names}
    meteor = None
    if meteor_available():
        try:
            meteor = MeteorScorer()
        except OSError:
            meteor = None
    try:
        if progress:
            print(f"[ablation] scores and bootstrap ({resamples} resamples)", flush=True)
        drawn = bootstrap_samples(rows, COLUMNS, resamples=resamples, seed=seed, meteor_scorer=meteor)
    finally:
        if meteor is not None:
            meteor.close()
    scores = {name: _row_scores(drawn, name, seeds) for name in names}
    differences = {f"{a} - {b}": _row_difference(drawn, a, b, seeds) for a, b in pairs()}
    return {
        "seeds": seeds,
        "rows": [{"name": r.name, "label": r.label, "base": r.base, "rct": r.rct, "parent": r.parent} for r in ROWS],
        "reference": {"name": REFERENCE[0], "label": REFERENCE[1]} if reference else None,
        "columns": [list(c) for c in COLUMNS],
        "scores": scores,
        "differences": differences,
        "intervals": {
            "method": "paired stratified percentile bootstrap over test questions, of the mean over seeds",
            "resamples": resamples,
            "confidence": CONFIDENCE,
            "meteor": meteor is not None,
        },
    }


def _per_seed(drawn, name: str, seeds, task: str, metric: str):
    """(point scores per seed, resampled scores averaged over seeds or None)."""
    points = [drawn.point[f"{name}@{s}"][task][metric] for s in seeds]
    arrays = [drawn.samples[(f"{name}@{s}", task, metric)] for s in seeds]
    mean = None if any(a is None for a in arrays) else np.mean(arrays, axis=0)
    return points, mean


def _stats(points: list, resampled, *, difference: bool) -> dict:
    from clinkd.eval.bootstrap import percentile_interval

    if any(p is None for p in points):
        return {"per_seed": points, "mean": None, "sd": None, "interval": None}
    values = np.array(points, dtype=float)
    out = {
        "per_seed": [float(v) for v in values],
        "mean": float(values.mean()),
        "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
        "interval": percentile_interval(resampled, CONFIDENCE),
    }
    if difference:
        interval = out["interval"]
        clear = interval is not None and (interval[0] > 0 or interval[1] < 0)
        same_sign = bool(np.all(np.sign(values) == np.sign(values.mean()))) and values.mean() != 0
        out.update(clear=clear, holds=clear and same_sign and len(values) > 1)
    return out


def _row_scores(drawn, name: str, seeds) -> dict:
    out = {}
    for task, metric in COLUMNS:
        if task not in drawn.tasks:
            continue
        points, mean = _per_seed(drawn, name, seeds, task, metric)
        out.setdefault(task, {})[metric] = _stats(points, mean, difference=False)
    return out


def _row_difference(drawn, a: str, b: str, seeds) -> dict:
    out = {}
    for task, metric in COLUMNS:
        if task not in drawn.tasks:
            continue
        pa, ma = _per_seed(drawn, a, seeds, task, metric)
        pb, mb = _per_seed(drawn, b, seeds, task, metric)
        points = [None if x is None or y is None else x - y for x, y in zip(pa, pb)]
        resampled = None if ma is None or mb is None else ma - mb
        out.setdefault(task, {})[metric] = _stats(points, resampled, difference=True)
    return out


def _cell(block: dict | None, *, signed: bool = False) -> str:
    if block is None or block.get("mean") is None:
        return "–"
    number = f"{block['mean']:+.1f}" if signed else f"{block['mean']:.1f}"
    sd = f" ± {block['sd']:.1f}" if block.get("sd") is not None else ""
    low, high = block["interval"] if block.get("interval") else (None, None)
    interval = f" [{low:.1f}, {high:.1f}]" if low is not None else ""
    mark = " **✓**" if block.get("holds") else ""
    return f"{number}{sd}{interval}{mark}"


def score_table(report: dict) -> str:
    """The ablation table: the teacher (``REFERENCE``, when scored), then one row per ``ROWS`` entry with
    the parts it has; mean ± sd [interval] per metric."""
    columns = [tuple(c) for c in report["columns"]]
    parts = {
        r["name"]: (r["base"] != "sft_stock", r["base"].startswith("kd"), r["base"] == "kd_curriculum", r["rct"])
        for r in report["rows"]
    }
    head = ["row", "MCG-RoPE", "KD", "curriculum", "RCT", *(f"{t} {m}" for t, m in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if report.get("reference"):
        name, label = report["reference"]["name"], report["reference"]["label"]
        cells = [_cell(report["scores"][name].get(t, {}).get(m)) for t, m in columns]
        lines.append("| " + " | ".join([label, "", "", "", "", *cells]) + " |")
    for r in report["rows"]:
        marks = ["✓" if p else "" for p in parts[r["name"]]]
        cells = [_cell(report["scores"][r["name"]].get(t, {}).get(m)) for t, m in columns]
        lines.append("| " + " | ".join([r["label"], *marks, *cells]) + " |")
    return "\n".join(lines)


def difference_table(report: dict) -> str:
    """Each reported pair: mean difference ± sd across seeds [bootstrap interval]; **✓** where it holds."""
    columns = [tuple(c) for c in report["columns"]]
    head = ["difference", *(f"{t} {m}" for t, m in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pair, block in report["differences"].items():
        cells = [_cell(block.get(t, {}).get(m), signed=True) for t, m in columns]
        lines.append("| " + " | ".join([pair.replace(" - ", " − "), *cells]) + " |")
    return "\n".join(lines)


def _rct_lines(report: dict) -> list[str]:
    lines = []
    for seed, by_row in sorted((report.get("rct") or {}).items(), key=lambda kv: int(kv[0])):
        for row, rounds in by_row.items():
            passed = ", ".join(f"{r['by_candidate']} of {r['wrong']} wrong" for r in rounds)
            lines.append(f"* seed {seed}, {row}: candidates passed per round: {passed}")
    return lines


def markdown(report: dict) -> str:
    ci = report["intervals"]
    machine = report.get("machine") or {}
    total = (report.get("timings_s") or {}).get("total")
    lines = [
        "# ClinKD ablation on the demo data",
        "",
        f"Seeds {report['seeds']}; macro over modalities, ×100; mean ± sd across seeds "
        f"[{round(100 * ci['confidence'])} % interval of the mean: {ci['method']}, {ci['resamples']} resamples].",
        "",
        score_table(report),
        "",
        "Differences (**✓**: the interval excludes 0 and every seed agrees in sign):",
        "",
        difference_table(report),
        "",
        "RCT:",
        "",
        *_rct_lines(report),
        "",
        f"commit {report.get('commit')}; {machine.get('processor')}, {machine.get('cpu_count')} CPUs, "
        f"{machine.get('torch_threads')} torch threads; {machine.get('platform')}"
        + (f"; {total / 60:.1f} min" if total else ""),
        "",
    ]
    return "\n".join(lines)


def write_summary(report: dict, folder) -> None:
    """``ablation.json`` (everything) and ``ablation.md`` (the tables) in ``folder``, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "ablation.json", json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    write_text_atomic(folder / "ablation.md", markdown(report))
