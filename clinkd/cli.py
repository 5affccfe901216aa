"""The ``clinkd`` command line.

    clinkd train --config run.yaml [--preset NAME] [--set key.path=value ...] [--no-resume] [--no-progress]
    clinkd check --config run.yaml [...]          every check train makes before training, then stop
    clinkd distill cache --config run.yaml [--stage NAME]   build / resume a kd stage's pseudo-label store
    clinkd presets                                the registered presets

Errors in the config or the data (ConfigError, DataError, StoreError) print one message and exit 2.
More sub-commands plug in with ``register_command(name, setup, run, help)``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

_COMMANDS: dict[str, tuple[Callable, Callable, str]] = {}


def register_command(name: str, setup: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int | None], help: str = "") -> None:
    """Add ``clinkd NAME``: ``setup(parser)`` adds its arguments, ``run(args)`` returns the exit code."""
    _COMMANDS[name] = (setup, run, help)


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run config (YAML)")
    parser.add_argument("--preset", help="start from a named preset (clinkd presets lists them)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.learning_rate=1e-5 (repeatable)")


def _load(args):
    from clinkd.train.config import ConfigError, load_config

    if args.config is None and args.preset is None:
        raise ConfigError("give --config FILE and/or --preset NAME")
    return load_config(args.config, preset=args.preset, overrides=args.overrides)


def _train_setup(parser):
    _config_arguments(parser)
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="refuse an output_dir that already holds stages (default: resume them)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _train(args) -> int:
    from clinkd.train.run import run_training

    if args.preset == "demo":  # the embedded demo: data, teacher, student, control, evaluation, report
        from clinkd.demo.pipeline import run_demo
        from clinkd.demo.report import clear_differences, score_table

        report = run_demo(args.config, overrides=args.overrides, progress=args.progress, resume=args.resume)
        ci = report["intervals"]
        print(f"\nDemo test split, macro ×100, {round(100 * ci['confidence'])} % intervals ({ci['method']}):\n")
        print(score_table(report))
        print("\nDifferences larger than their intervals:\n" + clear_differences(report))
        out = report["config"]["output_dir"]
        print(f"\ndemo report: {out}/report.md, predictions in {out}/predictions/ "
              f"({report['timings_s']['total']} s)")
        return 0

    config = _load(args)
    results = run_training(config, resume=args.resume, progress=args.progress)
    for stage, result in results.items():
        print(f"{stage}: {result['final']}")
    return 0


def _check_setup(parser):
    _config_arguments(parser)


def _check(args) -> int:
    from clinkd.train.run import prepare_run

    prepared = prepare_run(_load(args))
    print(f"ok: {len(prepared.dataset)} samples, stages {[s.name for s in prepared.config.stages]}")
    return 0


def _distill_setup(parser):
    sub = parser.add_subparsers(dest="action", required=True)
    cache = sub.add_parser("cache", help="run the teacher once and store its top-k pseudo-labels")
    _config_arguments(cache)
    cache.add_argument("--stage", help="the kd stage whose store to build (default: every kd stage with "
                                       "teacher: store)")
    cache.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _distill(args) -> int:
    from clinkd.train.config import ConfigError
    from clinkd.train.run import build_model, ensure_store, prepare_run

    config = _load(args)
    stages = [s for s in config.stages if s.type == "kd" and s.teacher == "store"
              and (args.stage is None or s.name == args.stage)]
    if not stages:
        raise ConfigError(f"no kd stage with teacher: store{' named ' + args.stage if args.stage else ''} in the config")
    prepared = prepare_run(config)
    teacher = []

    def factory():
        if not teacher:
            teacher.append(build_model(config.teacher, prepared.model_configs["teacher"], seed=config.seed + 1))
        return teacher[0]

    for stage in stages:
        store = ensure_store(prepared, stage, factory, progress=args.progress)
        print(f"{stage.name}: {store.folder} ({len(store)} samples, k={store.meta.k})")
    return 0


def _presets_setup(parser):
    pass


def _presets(args) -> int:
    from clinkd.train.presets import describe_presets

    for name, description in describe_presets().items():
        print(f"{name}: {description}")
    return 0


from clinkd.eval import cli as _eval_cli  # noqa: E402  (registers data, predict, eval)

register_command("train", _train_setup, _train, "run the stages of a config (KD, SFT), resuming by default")
register_command("check", _check_setup, _check, "check a config and its data without training")
register_command("distill", _distill_setup, _distill, "pseudo-label store commands (cache)")
register_command("presets", _presets_setup, _presets, "list the named presets")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clinkd", description="ClinKD training of Qwen2-VL on clinkd kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (setup, _, help_text) in _COMMANDS.items():
        setup(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    from clinkd.data.records import DataError
    from clinkd.distill.store import StoreError
    from clinkd.train.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(_COMMANDS[args.command][1](args) or 0)
    except (ConfigError, DataError, StoreError) as e:
        print(f"clinkd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
