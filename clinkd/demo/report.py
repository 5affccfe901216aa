"""The demo's report: ``report.md`` (scores with intervals, clear differences, wall times), ``loss_curves.png``
and ``report.json`` (everything, the loss curves and the bootstrap included).

    report = {"scores": {model: evaluate(...)}, "intervals": bootstrap_intervals(...), "timings_s": {...},
              "skipped": [steps resumed from an earlier run], "loss_curves": loss_curves(results), ...}
    write_report("runs/demo", report)
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from clinkd.io import write_bytes_atomic, write_text_atomic

# (task, metric) columns of the summary table
COLUMNS = (
    ("VG", "Recall@0.5"),
    ("ROC", "Accuracy"),
    ("RC", "BLEU-4"),
    ("RC", "ROUGE-L"),
    ("RC", "CIDEr"),
    ("MIA", "BLEU-1"),
    ("MIA", "ROUGE-L"),
    ("MIA", "METEOR"),
    ("MIA", "mBMR"),
)
NAMES = {
    "teacher": "teacher (SFT)",
    "student": "student MCG-RoPE (KD + curriculum → SFT)",
    "student_rct": "student MCG-RoPE (KD + curriculum → SFT → RCT)",
    "student_sft": "student MCG-RoPE (KD + curriculum → SFT → SFT, RCT's epochs on the ground truth)",
    "control": "student MCG-RoPE (SFT only)",
}
SHORT = {"student_rct": "student+RCT", "student_sft": "student+SFT"}
# the differences the report shows (report.json keeps every pair): distillation, RCT against its ablation
PAIRS = (
    ("teacher", "student"),
    ("teacher", "control"),
    ("student", "control"),
    ("student_rct", "student_sft"),
    ("student_rct", "student"),
    ("student_rct", "control"),
)


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _with_interval(block: dict | None) -> str:
    """'value [low, high]' of a bootstrap entry; 'n/a' when it has no value."""
    if block is None or block.get("value") is None:
        return "n/a"
    interval = block.get("interval")
    return _number(block["value"]) + ("" if interval is None else f" [{interval[0]:.2f}, {interval[1]:.2f}]")


def _short(name: str) -> str:
    return SHORT.get(name, name)


def shown_differences(report: dict) -> list[tuple[str, dict]]:
    """(label "a − b", {task: {metric: block}}) of the PAIRS present in the report, each as a − b (the
    bootstrap's b − a negated where it holds that order); every pair when the models are others."""
    differences = report["intervals"]["differences"]
    pairs = [(a, b) for a, b in PAIRS if f"{a} - {b}" in differences or f"{b} - {a}" in differences]
    if not pairs:
        pairs = [tuple(key.split(" - ")) for key in differences]
    out = []
    for a, b in pairs:
        if f"{a} - {b}" in differences:
            by_task = differences[f"{a} - {b}"]
        else:
            by_task = {
                t: {
                    m: dict(
                        block,
                        value=None if block["value"] is None else 0.0 - block["value"] + 0.0,
                        interval=None
                        if block["interval"] is None
                        else [0.0 - block["interval"][1] + 0.0, 0.0 - block["interval"][0] + 0.0],
                    )
                    for m, block in metrics.items()
                }
                for t, metrics in differences[f"{b} - {a}"].items()
            }
        out.append((f"{_short(a)} − {_short(b)}", by_task))
    return out


def score_table(report: dict) -> str:
    """The markdown table of each model's macro scores with their intervals, and of each difference."""
    intervals = report["intervals"]
    header = ["| | " + " | ".join(f"{t} {m}" for t, m in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    lines = header[:]
    for name, by_task in intervals["models"].items():
        cells = [_with_interval(by_task.get(t, {}).get(m)) for t, m in COLUMNS]
        lines.append(f"| {NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Differences (paired: the same resampled questions for both models; **bold**: the interval excludes 0):",
        "",
    ] + header
    for label, by_task in shown_differences(report):
        cells = []
        for t, m in COLUMNS:
            block = by_task.get(t, {}).get(m)
            cell = _with_interval(block)
            cells.append(f"**{cell}**" if block and block["clear"] else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def clear_differences(report: dict) -> str:
    """One sentence per pair of models: the metrics whose difference interval excludes 0, or none."""
    out = []
    for label, by_task in shown_differences(report):
        clear = [
            f"{t} {m} ({block['value']:+.2f})"
            for t, m in COLUMNS
            if (block := by_task.get(t, {}).get(m)) is not None and block["clear"]
        ]
        out.append(
            f"- {label.replace(' − ', ' vs ')}: "
            + (", ".join(clear) if clear else "no difference larger than its interval")
        )
    return "\n".join(out)


def rct_passed(report: dict) -> str | None:
    """ "round-1: 12 of 80, round-2: ..." — per RCT round, wrong answers a passing candidate corrected."""
    rounds = report.get("rct") or []
    if not rounds:
        return None
    return ", ".join(
        f"{r['round']}: {r['summary']['all']['by_candidate']} of {r['summary']['all']['wrong']}" for r in rounds
    )


def rct_section(report: dict) -> list[str]:
    """What each RCT round did (``clinkd rct-report``'s tables) and its share of the demo's time."""
    rounds = report.get("rct") or []
    if not rounds:
        return []
    from clinkd.rct.cli import format_rounds

    passed = rct_passed(report)
    correction = sum(r["cost"]["wall_s"] for r in rounds)
    training = sum(r["cost"].get("training_s") or 0.0 for r in rounds)
    total = report["timings_s"].get("total")
    share = f" of the demo's {total:.0f} s ({100 * correction / total:.0f} %)" if total else ""
    return [
        "## RCT rounds of the student",
        "",
        f"Correction (answers, candidates, scoring) took {correction:.1f} s{share}; the rounds' training "
        f"epochs {training:.1f} s. Wrong answers corrected by a passing candidate (the others kept the "
        f"ground truth): {passed}.",
        "",
        format_rounds(rounds).replace("## ", "### "),
    ]


def markdown(report: dict) -> str:
    first = next(iter(report["scores"].values()))
    ci = report["intervals"]
    lines = [
        "# ClinKD demo report",
        "",
        f"Scores of the models on the demo test split ({first['n']} questions), macro-averaged over "
        f"modalities, ×100, with {round(100 * ci['confidence'])} % confidence intervals: {ci['method']} "
        f"({ci['resamples']} resamples, seed {ci['seed']}).",
        "",
        score_table(report),
        "",
        "Differences larger than their intervals:",
        "",
        clear_differences(report),
        "",
        f"METEOR: {first['meteor']}. SPICE: {first['spice']}.",
        "",
        "Predictions: `predictions/<model>.jsonl`; models: `<model>/<stage>/final` (`clinkd predict --model "
        "...` applies the patch each was trained with).",
        "",
        *rct_section(report),
        "## Wall time (s)",
        "",
    ]
    skipped = set(report.get("skipped", ()))
    for step, seconds in report["timings_s"].items():
        note = " (skipped on resume: the time of the run that did it)" if step in skipped else ""
        lines.append(f"- {step}: {seconds}{note}")
    load = report["load_average"]
    lines += [
        "",
        f"Machine: {report.get('machine', 'n/a')}; {report['cpu_count']} CPUs, {report['torch_threads']} "
        f"torch threads; load average (1, 5, 15 min) {load['start']} at the start, {load['end']} at the end. "
        f"clinkd commit: {report.get('commit') or 'n/a'}.",
        "",
        "![loss curves](loss_curves.png)",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# loss curves


def loss_curves(results: dict, start: dict | None = None) -> dict:
    """{"series": {"<model>/<part>": [[step, value], ...]}, "boundaries": {model: [[step, "kd → sft"]]}} from
    ``run_training``'s results per model. Steps count optimizer steps over all of a model's stages (a
    later stage continues where the previous one ended), so the student and the control, trained for
    as many epochs, share one axis. Parts: ``ce`` (next-token cross-entropy), ``kd`` (the KD term, as the
    stage's loss form defines it) and ``objective`` (what a KD stage minimises: (α·KD + β·CE)/(α + β), or
    the released form's total); an SFT stage's objective is its CE. ``start``: {model: the step its run
    starts from} for a model that continues another's (default 0)."""
    series, boundaries = {}, {}
    for model, stages in results.items():
        offset = (start or {}).get(model, 0)
        names = list(stages)
        for i, stage in enumerate(names):
            history = stages[stage]["log_history"]
            for entry in history:
                if "loss" not in entry:
                    continue
                step = offset + int(entry["step"])
                parts = {"ce": entry.get("ce_loss", entry["loss"])}
                if "kd_loss" in entry:
                    parts.update(kd=entry["kd_loss"], objective=entry["loss"])
                for part, value in parts.items():
                    series.setdefault(f"{model}/{part}", []).append([step, float(value)])
            offset += max((int(e["step"]) for e in history if "step" in e), default=0)
            if i + 1 < len(names):
                boundaries.setdefault(model, []).append([offset, f"{stage} → {names[i + 1]}"])
    return {"series": series, "boundaries": boundaries}


_PART_LABELS = {"ce": "CE", "kd": "KD(teacher ‖ student) term", "objective": "KD-stage objective (αKD + βCE)/(α + β)"}
_STYLES = {"ce": "-", "kd": "--", "objective": ":"}


def plot_curves(curves: dict, path: Path) -> bool:
    """The training losses of every model along its whole run, stage boundaries marked; False when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = {}
    for label, points in curves["series"].items():
        model, part = label.split("/")
        colour = colours.setdefault(model, f"C{len(colours)}")
        if points:
            ax.plot(
                [s for s, _ in points],
                [v for _, v in points],
                _STYLES.get(part, "-"),
                color=colour,
                label=f"{model}: {_PART_LABELS.get(part, part)}",
            )
    for model, marks in curves["boundaries"].items():
        for step, text in marks:
            ax.axvline(step, color=colours.get(model, "grey"), linewidth=0.8, alpha=0.6)
            ax.annotate(
                f"{model}: {text}",
                (step, 0.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, 4),
                textcoords="offset points",
                fontsize=8,
                color=colours.get(model, "grey"),
            )
    ax.set_title("ClinKD demo: training losses along each model's whole run")
    ax.set_xlabel("optimizer step (a later stage continues the count)")
    ax.set_ylabel("loss (nats per supervised token)")
    ax.set_yscale("log")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, png.getvalue())
    return True


def write_report(out: str | Path, report: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report["loss_curves_png"] = plot_curves(report["loss_curves"], out / "loss_curves.png")
    write_text_atomic(out / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    write_text_atomic(out / "report.md", markdown(report))
