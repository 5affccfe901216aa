"""``clinkd train``, ``check``, ``distill cache`` / ``import`` and ``presets`` (see ``clinkd.cli``).

    clinkd train --config run.yaml [--preset NAME] [--set key.path=value ...] [--no-resume] [--no-progress]
    clinkd check --config run.yaml [--preset NAME] [--set ...]
    clinkd distill cache --config run.yaml [--stage NAME] [--no-progress]
    clinkd distill import --config run.yaml [--stage NAME] --from FILE.jsonl [--format vllm] [--no-progress]
    clinkd presets

Setting up the arguments imports nothing heavy (``--help`` is instant); the run functions import the
trainer when they run.
"""

from __future__ import annotations

import argparse


def config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run config (YAML)")
    parser.add_argument("--preset", help="start from a named preset (clinkd presets lists them)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.learning_rate=1e-5 (repeatable)",
    )


def load(args):
    """The RunConfig of ``--config`` / ``--preset`` / ``--set``."""
    from .config import load_config
    from .errors import ConfigError

    if args.config is None and args.preset is None:
        raise ConfigError("give --config FILE and/or --preset NAME")
    return load_config(args.config, preset=args.preset, overrides=args.overrides)


def train_arguments(parser):
    config_arguments(parser)
    parser.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="refuse an output_dir that already holds stages (default: resume them)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def train_command(args) -> int:
    config = load(args)  # config errors before the trainer is imported
    from .arguments import exit_launched_process
    from .run import run_training

    results = run_training(config, resume=args.resume, progress=args.progress)
    for stage, result in results.items():
        print(f"{stage}: {result['final']}")
    exit_launched_process(0)  # one of several processes: ends here, its group closed
    return 0


def check_arguments(parser):
    config_arguments(parser)


def check_command(args) -> int:
    config = load(args)
    from .run import prepare_run

    prepared = prepare_run(config)
    print(f"ok: {len(prepared.dataset)} samples, stages {[s.name for s in prepared.config.stages]}")
    return 0


def distill_arguments(parser):
    sub = parser.add_subparsers(dest="action", required=True)
    cache = sub.add_parser("cache", help="run the teacher once and store its top-k pseudo-labels")
    config_arguments(cache)
    cache.add_argument(
        "--stage", help="the kd stage whose store to build (default: every kd stage with teacher: store)"
    )
    cache.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    imported = sub.add_parser(
        "import", help="store a teacher's top-k log-probabilities computed elsewhere (vLLM prompt_logprobs)"
    )
    config_arguments(imported)
    imported.add_argument("--stage", help="the kd stage whose store to fill (needed when the config has several)")
    imported.add_argument(
        "--from", dest="source", required=True, metavar="FILE", help="JSON Lines, one sample per line"
    )
    imported.add_argument(
        "--format", default="vllm", choices=["vllm"], help="vllm: id, prompt_token_ids, prompt_logprobs"
    )
    imported.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _store_stages(config, name):
    from .errors import ConfigError

    stages = [s for s in config.stages if s.type == "kd" and s.teacher == "store" and (name is None or s.name == name)]
    if not stages:
        raise ConfigError(f"no kd stage with teacher: store{' named ' + name if name else ''} in the config")
    return stages


def distill_command(args) -> int:
    config = load(args)
    if args.action == "import":
        return distill_import(config, args)
    from .artifacts import ensure_store
    from .models import build_model
    from .run import prepare_run

    stages = _store_stages(config, args.stage)
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


def distill_import(config, args) -> int:
    """``clinkd distill import``: the stage's store filled from ``--from`` where ``distill cache`` writes it."""
    from .errors import ConfigError

    stages = _store_stages(config, args.stage)
    if len(stages) > 1:
        names = ", ".join(s.name for s in stages)
        raise ConfigError(f"the config has several kd stages with teacher: store ({names}): name one with --stage")
    open(args.source, "rb").close()  # a missing file is reported before the run is prepared
    from ..distill.imported import import_prompt_logprobs
    from ..distill.store import PseudoLabelStore
    from .artifacts import store_meta
    from .models import vocab_size
    from .run import prepare_run

    prepared, stage = prepare_run(config), stages[0]
    meta = store_meta(config, stage, prepared.processor, vocab_size(prepared.model_configs["student"]))
    summary = import_prompt_logprobs(
        args.source,
        prepared.dataset,
        config.store_path(stage),
        meta,
        teacher_vocab_size=vocab_size(prepared.model_configs["teacher"]),
        format=args.format,
        shard_size=stage.shard_size,
        progress=args.progress,
    )
    store = PseudoLabelStore(config.store_path(stage), expect=meta)
    print(
        f"{stage.name}: {store.folder} ({len(store)} samples, k={meta.k}; imported {summary.imported} samples, "
        f"{summary.rows} rows; log-prob error bound {summary.max_error_bound:.3g} at T={meta.temperature:g})"
    )
    return 0


def presets_arguments(parser):
    pass


def presets_command(args) -> int:
    from .presets import describe_presets

    for name, description in describe_presets().items():
        print(f"{name}: {description}")
    return 0
