"""``clinkd rct-report FOLDER [--json FILE]``: what each RCT round of a run did (see ``clinkd.cli``).

FOLDER is a run's output_dir or one rct stage's folder. For every round with a corrections file: the
similarity model that judged, per task how many answers were wrong and how many were corrected by a
candidate or kept their ground truth, the selected candidates' score gain, then the round's cost:
tokens generated, generation and scoring seconds, tokens/s, and the correction's share of the round
(training included) when the round is complete.
"""

from __future__ import annotations

import json
from pathlib import Path


def rounds_of(folder: Path) -> list[Path]:
    """The round folders (``round-N`` with a corrections file) of a stage folder, or of every stage of a
    run folder, in stage then round order."""

    def number(path: Path) -> int:
        tail = path.name.split("-", 1)[1]
        return int(tail) if tail.isdigit() else -1

    stages = [folder] if any(folder.glob("round-*")) else sorted(p for p in folder.iterdir() if p.is_dir())
    out = []
    for stage in stages:
        out += sorted((p for p in stage.glob("round-*") if (p / "corrections.jsonl").is_file()), key=number)
    return out


def round_report(folder: Path) -> dict:
    from .summary import summarise

    lines = [
        json.loads(x) for x in (folder / "corrections.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()
    ]
    stats = json.loads((folder / "round_stats.json").read_text(encoding="utf-8"))
    done = folder / "round.json"
    timings = json.loads(done.read_text(encoding="utf-8"))["timings_s"] if done.is_file() else None
    tokens = stats["answer_tokens"] + stats["candidate_tokens"]
    cost = {**stats, "tokens_per_s": tokens / stats["generation_s"] if stats["generation_s"] else None}
    if timings is not None:
        cost["training_s"] = timings["training"]
        cost["correction_share"] = timings["correction"] / (timings["correction"] + timings["training"])
    return {
        "round": folder.name,
        "stage": folder.parent.name,
        "summary": summarise(lines),
        "cost": cost,
        "complete": timings is not None,
    }


def format_rounds(reports: list[dict]) -> str:
    from .summary import summary_table

    parts = []
    for r in reports:
        c = r["cost"]
        share = (
            f", {100 * c['correction_share']:.0f} % of the round (training {c['training_s']:.1f} s)"
            if r["complete"]
            else " (the round's training has not finished)"
        )
        rate = f"{c['tokens_per_s']:.0f}" if c["tokens_per_s"] else "–"
        parts.append(
            f"## {r['stage']} / {r['round']}\n\nsimilarity: {', '.join(r['summary']['similarity_model'])}\n\n"
            f"{summary_table(r['summary'])}\n\n"
            f"generation: {c['answer_tokens']} answer + {c['candidate_tokens']} candidate tokens for "
            f"{c['questions']} questions in {c['generation_s']:.1f} s ({rate} tokens/s), scoring "
            f"{c['scoring_s']:.1f} s; correction {c['wall_s']:.1f} s{share}\n"
        )
    return "\n".join(parts)


def rct_report_arguments(parser) -> None:
    from clinkd.cli_paths import input_folder, output_file

    parser.add_argument("folder", type=input_folder, help="a run's output_dir, or an rct stage's folder")
    parser.add_argument("--json", type=output_file, default=None, help="also write the report as JSON here")


def rct_report_command(args) -> int:
    from clinkd.io import write_text_atomic

    from .round import RCTError

    folders = rounds_of(Path(args.folder))
    if not folders:
        raise RCTError(f"{args.folder} holds no RCT round (no round-N/corrections.jsonl in it or its stages)")
    reports = [round_report(f) for f in folders]
    print(format_rounds(reports), end="")
    if args.json:
        write_text_atomic(args.json, json.dumps(reports, indent=1) + "\n")
    return 0
