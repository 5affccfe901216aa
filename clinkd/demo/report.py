"""The demo's report: ``report.md`` (macro scores of each model), ``loss_curves.png``, ``report.json``."""

from __future__ import annotations

import io
import json
from pathlib import Path

from clinkd_kernels._io import write_bytes_atomic, write_text_atomic

# (task, metric) columns of the summary table
COLUMNS = (("VG", "Recall@0.5"), ("ROC", "Accuracy"), ("RC", "BLEU-4"), ("RC", "ROUGE-L"), ("RC", "CIDEr"),
           ("MIA", "BLEU-1"), ("MIA", "ROUGE-L"), ("MIA", "METEOR"), ("MIA", "mBMR"))
NAMES = {"teacher": "teacher (SFT)", "student": "student MCG-RoPE (KD + curriculum → SFT)",
         "control": "student MCG-RoPE (SFT only)"}


def _cell(scores: dict, task: str, metric: str) -> str:
    value = scores["tasks"].get(task, {}).get("macro", {}).get(metric)
    return "n/a" if value is None else f"{value:.2f}"


def markdown(report: dict) -> str:
    """The summary table (macro over modalities, percentages) plus timings and the machine's load."""
    lines = ["# ClinKD demo report", "",
             "Scores on the demo test split (macro-averaged over modalities, ×100), measured by this run.", "",
             "| model | " + " | ".join(f"{t} {m}" for t, m in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, scores in report["scores"].items():
        lines.append(f"| {NAMES.get(name, name)} | " + " | ".join(_cell(scores, t, m) for t, m in COLUMNS) + " |")
    first = next(iter(report["scores"].values()))
    lines += ["", f"METEOR: {first['meteor']}. SPICE: {first['spice']}.", "", "## Wall time (s)", ""]
    lines += [f"- {k}: {v}" for k, v in report["timings_s"].items()]
    lines += ["", f"Load average (1, 5, 15 min) at start {report['load_average']['start']}, at end "
              f"{report['load_average']['end']}; {report['cpu_count']} CPUs, {report['torch_threads']} torch threads.",
              "", "![loss curves](loss_curves.png)", ""]
    return "\n".join(lines)


def plot_curves(curves: dict, path: Path) -> bool:
    """Training loss against step, one line per model/stage; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], label=label)
    ax.set_xlabel("step (within the stage)")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
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
