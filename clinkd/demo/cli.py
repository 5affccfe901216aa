"""``clinkd demo`` (see ``clinkd.cli``): the embedded demo end to end, the score table on the console.

clinkd demo [--config FILE] [--set key.path=value ...] [--no-resume] [--no-progress]
"""

from __future__ import annotations


def demo_arguments(parser):
    parser.add_argument("--config", help="YAML keys over the demo's run config (clinkd.demo.pipeline.demo_preset)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set output_dir=runs/demo2 (repeatable)",
    )
    parser.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="refuse an output folder that already holds stages (default: resume them)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def demo_command(args) -> int:
    from .pipeline import run_demo
    from .report import clear_differences, rct_passed, score_table

    report = run_demo(args.config, overrides=args.overrides, progress=args.progress, resume=args.resume)
    ci = report["intervals"]
    print(f"\nDemo test split, macro ×100, {round(100 * ci['confidence'])} % intervals ({ci['method']}):\n")
    print(score_table(report))
    print("\nDifferences larger than their intervals:\n" + clear_differences(report))
    if rct_passed(report):
        print(f"\nRCT: wrong answers corrected by a passing candidate per round: {rct_passed(report)}")
    out = report["config"]["output_dir"]
    print(f"\ndemo report: {out}/report.md, predictions in {out}/predictions/ ({report['timings_s']['total']} s)")
    return 0
