"""The ``clinkd`` command line: a table of commands, each imported only when it runs.

    clinkd train --config run.yaml [--preset NAME] [--set key.path=value ...] [--no-resume] [--no-progress]
    clinkd check --config run.yaml [...]          every check train makes before training, then stop
    clinkd distill cache --config run.yaml [--stage NAME]   build / resume a kd stage's pseudo-label store
    clinkd distill import --config run.yaml --from FILE.jsonl [--stage NAME]   a served teacher's log-probs into it
    clinkd presets                                the registered presets
    clinkd demo [--config FILE] [--set key.path=value ...] [--no-resume] [--no-progress]   the embedded demo
    clinkd experiment ablation [--seeds 3] [--results DIR] [...]   the ablation table over training seeds
    clinkd data demo --out DIR [...]              write the generated demo data set
    clinkd predict --model FOLDER --data test.jsonl --out preds.jsonl [...]
    clinkd eval --pred preds.jsonl [--data test.jsonl] [...]
    clinkd rct-report FOLDER [--json report.json]   what each RCT round of a run did

Each command is ``module``: ``setup(parser)`` adds its arguments, ``run(args)`` returns the exit code.
A user error prints one line on stderr (``clinkd COMMAND: error: ...``) and exits 2: a bad argument,
an error in the config or the data (ConfigError, DataError, StoreError), a file or folder the command
cannot read or write (OSError), text that is not UTF-8 (UnicodeError) or YAML that does not parse. Any
other exception is a bug of clinkd's and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    module: str  # imported only when this command is set up (its --help included) and run
    setup: str  # setup(parser): adds the command's arguments
    run: str  # run(args) -> exit code (None = 0)
    help: str


COMMANDS: dict[str, Command] = {
    "train": Command(
        "clinkd.train.cli",
        "train_arguments",
        "train_command",
        "run the stages of a config (KD, SFT), resuming by default",
    ),
    "check": Command(
        "clinkd.train.cli", "check_arguments", "check_command", "check a config and its data without training"
    ),
    "distill": Command(
        "clinkd.train.cli", "distill_arguments", "distill_command", "pseudo-label store commands (cache, import)"
    ),
    "presets": Command("clinkd.train.cli", "presets_arguments", "presets_command", "list the named presets"),
    "demo": Command(
        "clinkd.demo.cli",
        "demo_arguments",
        "demo_command",
        "the embedded CPU demo: data, teacher, KD → SFT → RCT student, ablation, control, evaluation, report",
    ),
    "experiment": Command(
        "clinkd.experiment.cli",
        "experiment_arguments",
        "experiment_command",
        "experiments on the demo data (ablation: each part of ClinKD on and off, over several seeds)",
    ),
    "data": Command(
        "clinkd.eval.cli", "data_arguments", "data_command", "data sets (demo: write the generated demo data set)"
    ),
    "predict": Command(
        "clinkd.eval.cli",
        "predict_arguments",
        "predict_command",
        "greedy, batched answers of a model → predictions JSONL",
    ),
    "eval": Command(
        "clinkd.eval.cli",
        "eval_arguments",
        "eval_command",
        "Med-GRIT metrics of a predictions file, per modality and macro",
    ),
    "rct-report": Command(
        "clinkd.rct.cli",
        "rct_report_arguments",
        "rct_report_command",
        "what each RCT round of a run did: wrong answers, corrections, score gain, cost",
    ),
}

# The errors a user fixes in the config or the data: (module, class). An error of a module that was
# never imported cannot have been raised, so only the imported ones are looked at.
USER_ERRORS = (
    ("clinkd.train.errors", "ConfigError"),
    ("clinkd.data.records", "DataError"),
    ("clinkd.distill.store", "StoreError"),
    ("clinkd.rct.round", "RCTError"),
    ("clinkd.rct.similarity", "SimilarityError"),
)


def _function(command: Command, name: str):
    return getattr(importlib.import_module(command.module), name)


class UsageError(SystemExit):
    """A bad command line (argparse's error, exit code 2), already reported on stderr."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): ``clinkd train: error: ... (see clinkd train --help)``."""

    def error(self, message: str):
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        raise UsageError(2)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command name; only ``command``'s arguments are set up (its module imported)."""
    parser = _Parser(prog="clinkd", description="ClinKD training of Qwen2-VL on clinkd kernels")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, spec in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=spec.help, description=spec.help)
        if name == command:
            _function(spec, spec.setup)(sub_parser)
    return parser


def _user_error(error: BaseException) -> bool:
    for module, name in USER_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(error, getattr(loaded, name)):
            return True
    return False


def one_line(text: str) -> str:
    """``text`` on one line (its lines joined by spaces)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _os_error(error: OSError) -> str:
    """An OSError as "what: path" (both paths of a rename or copy)."""
    what = error.strerror or str(error) or type(error).__name__
    paths = [p for p in (error.filename, getattr(error, "filename2", None)) if p is not None]
    return f"{what}: {' -> '.join(str(p) for p in paths)}" if paths else what


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of an error the user can fix (see the module docstring), or None for a bug."""
    if _user_error(error):
        return one_line(str(error))
    if isinstance(error, OSError):
        return one_line(_os_error(error))
    if isinstance(error, UnicodeError):
        return one_line(f"text that is not UTF-8 ({error})")
    yaml = sys.modules.get("yaml")
    if yaml is not None and isinstance(error, yaml.YAMLError):
        return one_line(f"not valid YAML ({error})")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    except UsageError:
        return 2
    spec = COMMANDS[args.command]
    try:
        return int(_function(spec, spec.run)(args) or 0)
    except Exception as e:
        message = user_error_message(e)
        if message is None:
            raise
        print(f"clinkd {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
