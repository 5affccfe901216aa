"""``clinkd experiment ablation`` (see ``clinkd.cli``): the ablation table over several training seeds.

clinkd experiment ablation [--config FILE] [--set key.path=value ...] [--seeds N] [--results DIR]
                           [--resamples N] [--no-resume] [--no-progress]
"""

from __future__ import annotations

import argparse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def experiment_arguments(parser):
    sub = parser.add_subparsers(dest="experiment", required=True)
    ablation = sub.add_parser("ablation", help="each part of ClinKD on and off, over several training seeds")
    ablation.add_argument("--config", help="YAML keys over the demo's run config (clinkd.demo.pipeline.demo_preset)")
    ablation.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set output_dir=runs/ablation2 (repeatable)",
    )
    ablation.add_argument(
        "--seeds", type=_positive, default=3, help="training seeds: the config's seed and the next (default 3)"
    )
    ablation.add_argument("--results", metavar="DIR", help="also write ablation.json and ablation.md here")
    ablation.add_argument("--resamples", type=_positive, default=1000, help="bootstrap resamples (default 1000)")
    ablation.add_argument(
        "--no-resume", dest="resume", action="store_false", help="refuse runs that already hold stages"
    )
    ablation.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def experiment_command(args) -> int:
    from clinkd.demo.pipeline import _demo_mapping

    from .ablation import run_ablation
    from .summary import difference_table, score_table

    first = int(_demo_mapping(args.config, args.overrides).get("seed", 0))
    report = run_ablation(
        args.config,
        seeds=list(range(first, first + args.seeds)),
        overrides=args.overrides,
        results=args.results,
        resamples=args.resamples,
        resume=args.resume,
        progress=args.progress,
    )
    print("\n" + score_table(report) + "\n\n" + difference_table(report))
    print(f"\nablation report: {report['config']['output_dir']}/ablation.md ({report['timings_s']['total']} s)")
    return 0
