"""Run LLaMA-Factory with clinkd's kernels and MCG-RoPE positions in its Qwen-VL models.

    python launch.py [clinkd options] train config.yaml [key=value ...]
    python launch.py --modality-gap 1 --vision-stride 1 --backend cpu train config.yaml

Everything after the clinkd options is what ``llamafactory-cli`` takes, unchanged: the config and
its overrides are LLaMA-Factory's own (no extra yaml keys). The launcher calls
``clinkd.apply_to_transformers`` (class patches of every Qwen-VL family transformers has) before
LLaMA-Factory builds the model, then hands over:

- ``train``: ``llamafactory.train.tuner.run_exp`` in this process, as ``llamafactory-cli train`` does
  on one device. Where ``llamafactory-cli`` would start ``torchrun`` itself (more than one device, or
  FORCE_TORCHRUN=1), the launcher starts ``torchrun`` on itself instead, with the same arguments, so
  every worker applies the patch before building its model (NNODES, NODE_RANK, NPROC_PER_NODE,
  MASTER_ADDR, MASTER_PORT are read as LLaMA-Factory reads them).
- any other command (``chat``, ``export``, ``api``, ``webchat``, ``webui``, ``env``, ...):
  ``llamafactory.cli.main``.

``--report FILE`` writes JSON: the versions, the settings applied per family and, for ``train``, the
class of the model the trainer got and the clinkd settings it runs with (``clinkd.patch.patch_settings``
of the model: null would mean it runs stock). ``--count-ops`` adds how often each ``clinkd::`` kernel
was dispatched during ``train`` (a counting dispatch mode: a diagnostic, it slows every op a little).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch.py",
        description="llamafactory-cli with clinkd applied to the Qwen-VL models it builds",
        usage="%(prog)s [clinkd options] COMMAND [llamafactory-cli arguments]",
    )
    p.add_argument("--modality-gap", type=int, default=None, help="MCG-RoPE modality gap λ (clinkd default: 2)")
    p.add_argument("--vision-stride", type=int, default=None, help="MCG-RoPE vision stride α (clinkd default: 1)")
    p.add_argument(
        "--stock-positions",
        action="store_true",
        help="keep transformers' positions (mcg_rope=None): fused attention and loss only",
    )
    p.add_argument("--no-attention", action="store_true", help="keep the stock decoder attention")
    p.add_argument("--no-loss", action="store_true", help="keep the stock causal-LM loss")
    p.add_argument("--backend", default=None, help="clinkd kernel backend: cpu, triton, torch (default: by device)")
    p.add_argument("--report", default=None, help="write a JSON report of the patch to this file")
    p.add_argument("--count-ops", action="store_true", help="count clinkd kernel calls during train (into --report)")
    return p


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the launcher's options, the llamafactory-cli arguments from the command on)."""
    valued = {
        a.option_strings[0]
        for a in _parser()._actions
        if a.nargs is None and a.option_strings and not isinstance(a, (argparse._StoreTrueAction, argparse._HelpAction))
    }
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in valued else 1
    return argv[:i], argv[i:]


def _mcg_rope(opts):
    if opts.stock_positions:
        if opts.modality_gap is not None or opts.vision_stride is not None:
            raise SystemExit("launch.py: --stock-positions excludes --modality-gap and --vision-stride")
        return None
    rope = {}
    if opts.modality_gap is not None:
        rope["modality_gap"] = opts.modality_gap
    if opts.vision_stride is not None:
        rope["vision_stride"] = opts.vision_stride
    return rope


def _plain(settings):
    if settings is None:
        return None
    if dataclasses.is_dataclass(settings):
        return json.loads(json.dumps(dataclasses.asdict(settings), default=str))
    return repr(settings)


def _write(path: str | None, report: dict) -> None:
    if path is None:
        return
    if os.environ.get("RANK", "0") != "0":  # one report per run: the first worker's
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


class _OpCounter:
    """Counts the ``clinkd::`` ops dispatched while active."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = Counter()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.name()
                if name.startswith("clinkd::"):
                    counts[name] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()


def _report_callback(report: dict, path: str | None):
    from transformers import TrainerCallback

    from clinkd.patch import patch_settings

    class ClinkdReport(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            base = model
            while hasattr(base, "get_base_model") or hasattr(base, "module"):  # PEFT, DDP wrappers
                base = base.get_base_model() if hasattr(base, "get_base_model") else base.module
            report["trained_model"] = {"class": type(base).__name__, "clinkd": _plain(patch_settings(base))}
            _write(path, report)

    return ClinkdReport()


def _torchrun_needed(command: str) -> bool:
    if command != "train" or "LOCAL_RANK" in os.environ:  # a torchrun worker already
        return False
    from llamafactory.extras.misc import get_device_count, is_env_enabled, use_kt, use_ray

    return (
        is_env_enabled("FORCE_TORCHRUN")
        or is_env_enabled("USE_MCA")
        or (get_device_count() > 1 and not use_ray() and not use_kt())
    )


def _torchrun(own: list[str], rest: list[str]) -> int:
    from llamafactory.extras.misc import find_available_port, get_device_count

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        os.getenv("NNODES", "1"),
        "--node_rank",
        os.getenv("NODE_RANK", "0"),
        "--nproc_per_node",
        os.getenv("NPROC_PER_NODE", str(get_device_count())),
        "--master_addr",
        os.getenv("MASTER_ADDR", "127.0.0.1"),
        "--master_port",
        os.getenv("MASTER_PORT", str(find_available_port())),
        os.path.abspath(__file__),
        *own,
        *rest,
    ]
    return subprocess.run(cmd, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, rest = _split(argv)
    opts = _parser().parse_args(own)
    if not rest:
        _parser().print_help()
        return 2
    command = rest[0]
    if opts.count_ops and opts.report is None:
        raise SystemExit("launch.py: --count-ops writes its counts into the --report file: give --report FILE")
    kwargs = dict(
        mcg_rope=_mcg_rope(opts), attention=not opts.no_attention, loss=not opts.no_loss, backend=opts.backend
    )
    if kwargs["mcg_rope"] == {}:
        del kwargs["mcg_rope"]  # clinkd's default MCG-RoPE settings

    import transformers

    import clinkd

    if _torchrun_needed(command):  # the workers apply the patch themselves
        return _torchrun(own, rest)

    applied = clinkd.apply_to_transformers(**kwargs)
    import llamafactory

    report = {
        "clinkd": clinkd.__version__,
        "transformers": transformers.__version__,
        "llamafactory": llamafactory.__version__,
        "command": rest,
        "applied": {family: _plain(s) for family, s in applied.items()},
    }
    _write(opts.report, report)

    if command != "train":
        sys.argv = [sys.argv[0], *rest]
        from llamafactory.cli import main as cli_main

        cli_main()
        return 0

    from llamafactory.train.tuner import run_exp

    sys.argv = [sys.argv[0], *rest[1:]]  # what run_exp reads: the config and its overrides
    callbacks = [_report_callback(report, opts.report)] if opts.report else None
    counter = _OpCounter() if opts.count_ops else None
    if counter is None:
        run_exp(callbacks=callbacks)
    else:
        with counter.mode:
            run_exp(callbacks=callbacks)
        report["ops"] = dict(sorted(counter.counts.items()))
    _write(opts.report, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
