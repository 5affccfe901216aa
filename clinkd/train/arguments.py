"""A stage's TrainingArguments, and the process state (accelerate's) the run trains in."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .specs import RunConfig, StageSpec


def training_arguments(
    config: RunConfig, stage: StageSpec, *, progress: bool, output_dir: str | None = None, overrides: dict | None = None
):
    """The TrainingArguments of ``stage``: the run's keywords, the stage's, then ``overrides``; the run's
    seed unless one is given; in ``output_dir`` (default: the stage's folder)."""
    from transformers import TrainingArguments

    kwargs = {"report_to": "none", **config.stage_args(stage), **(overrides or {})}
    kwargs.setdefault("seed", config.seed)
    if _own_state_is_set_up():  # transformers would otherwise replace it by one process per process
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()  # the last stage's engine plugins (transformers resets them too)
        kwargs["accelerator_config"] = {**(kwargs.get("accelerator_config") or {}), "use_configured_state": True}
    if not progress:
        kwargs["disable_tqdm"] = True
    return TrainingArguments(
        output_dir=output_dir or str(Path(config.output_dir) / stage.name),
        remove_unused_columns=False,
        label_names=["labels"],
        **kwargs,
    )


_OWN_STATE = {"deepspeed": False}  # whether distributed_state set accelerate's state up itself


def _own_state_is_set_up() -> bool:
    from accelerate import PartialState

    return _OWN_STATE["deepspeed"] and bool(PartialState._shared_state)


def distributed_state(config: RunConfig):
    """accelerate's process state (the one Trainer uses). Without GPUs, several launched processes join
    one gloo group (accelerate alone would leave each on its own). A DeepSpeed run on GPUs (or in one
    process) takes its state from its training arguments, which put accelerate in DeepSpeed's mode; in
    several processes without GPUs, ``_deepspeed_cpu_state`` sets that mode up over gloo (transformers
    would give accelerate no backend there, and each process would count itself alone). Launched as
    several processes (WORLD_SIZE > 1) that still did not join one group, they would train apart, each
    on all the data: a RuntimeError says so instead."""
    import torch
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = next((s for s in config.stages if config.stage_args(s).get("deepspeed")), None)
    _OWN_STATE["deepspeed"] = False
    if deepspeed is not None and launched > 1 and not torch.cuda.is_available():
        state = _deepspeed_cpu_state()
    elif deepspeed is not None:
        with tempfile.TemporaryDirectory(prefix="clinkd-state-") as scratch:
            _ = training_arguments(config, deepspeed, progress=False, output_dir=scratch).device  # sets the state up
        state = PartialState()
    else:
        state = PartialState(cpu=not torch.cuda.is_available() and launched > 1)
    if launched > 1 and state.num_processes != launched:
        raise RuntimeError(
            f"launched as {launched} processes (WORLD_SIZE), but they did not join one process group "
            f"(accelerate sees {state.num_processes}): they would train apart; launch with torchrun, "
            "the deepspeed launcher or accelerate launch (on CPUs: ACCELERATE_USE_CPU=true without DeepSpeed)"
        )
    return state


def _deepspeed_cpu_state():
    """accelerate's DeepSpeed state over gloo for processes without GPUs (DeepSpeed's CPU accelerator:
    DS_ACCELERATOR=cpu, or none found). Every TrainingArguments built after it keeps it
    (``use_configured_state``) instead of making one without a backend."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what transformers sets while it makes the state
    try:
        state = PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    _OWN_STATE["deepspeed"] = True
    return state


__all__ = ["distributed_state", "training_arguments"]
