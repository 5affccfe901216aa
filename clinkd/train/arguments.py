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
        _keep_own_state(kwargs)
    if not progress:
        kwargs["disable_tqdm"] = True
    return TrainingArguments(
        output_dir=output_dir or str(Path(config.output_dir) / stage.name),
        remove_unused_columns=False,
        label_names=["labels"],
        **kwargs,
    )


_OWN_STATE = {"engine": None}  # the engine distributed_state set accelerate's state up for itself, if any


def _own_state_is_set_up() -> bool:
    from accelerate import PartialState

    return _OWN_STATE["engine"] is not None and bool(PartialState._shared_state)


def forget_own_state() -> None:
    """After a run: the state stays (its process group too), but later TrainingArguments make their own."""
    _OWN_STATE["engine"] = None


def _close_process_group() -> bool:
    """At the end of a process that trained: every process waits for the others, then the process
    group is destroyed. Returns whether there was one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    return True


def exit_launched_process(code: int = 0) -> None:
    """End one of several launched processes (WORLD_SIZE > 1) once its work is done and written: every
    process waits for the others, the process group is destroyed, output is flushed, and the process
    leaves without the interpreter's teardown. Objects that still hold a gloo group (an engine's, a
    device mesh's) are otherwise destroyed during that teardown, and gloo's worker threads then abort
    the process ("terminate called without an active exception"), turning a finished run into a failed
    one for its launcher. Returns (does nothing) in one process."""
    import logging
    import sys

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    _close_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _keep_own_state(kwargs: dict) -> None:
    """Training arguments that keep the state ``distributed_state`` made (``use_configured_state``), with
    the last stage's engine plugins dropped, as transformers drops them for each new TrainingArguments.
    For FSDP on CPUs the state is marked as one of the GPU kinds, the only ones accelerate turns into
    FSDP; the Accelerator then sets it to FSDP. Nothing in FSDP2's path needs a GPU: the device mesh is
    the CPU's and the collectives are gloo's."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    AcceleratorState._reset_state()
    if _OWN_STATE["engine"] == "fsdp":
        PartialState().distributed_type = DistributedType.MULTI_GPU if kwargs.get("fsdp") else DistributedType.MULTI_CPU
    kwargs["accelerator_config"] = {**(kwargs.get("accelerator_config") or {}), "use_configured_state": True}


def distributed_state(config: RunConfig):
    """accelerate's process state (the one Trainer uses). Without GPUs, several launched processes join
    one gloo group (accelerate alone would leave each on its own). A DeepSpeed run on GPUs (or in one
    process) takes its state from its training arguments, which put accelerate in DeepSpeed's mode; in
    several processes without GPUs, ``_deepspeed_cpu_state`` sets that mode up over gloo (transformers
    would give accelerate no backend there, and each process would count itself alone), and FSDP gets
    the CPU group with the engine accelerate keeps for GPUs (``_keep_own_state``). Launched as
    several processes (WORLD_SIZE > 1) that still did not join one group, they would train apart, each
    on all the data: a RuntimeError says so instead."""
    import torch
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = next((s for s in config.stages if config.stage_args(s).get("deepspeed")), None)
    fsdp = any(config.stage_args(s).get("fsdp") for s in config.stages)
    cpu_processes = launched > 1 and not torch.cuda.is_available()
    _OWN_STATE["engine"] = None
    if cpu_processes:
        _check_one_engine(config)
    if deepspeed is not None and cpu_processes:
        state = _deepspeed_cpu_state()
    elif deepspeed is not None:
        with tempfile.TemporaryDirectory(prefix="clinkd-state-") as scratch:
            _ = training_arguments(config, deepspeed, progress=False, output_dir=scratch).device  # sets the state up
        state = PartialState()
    else:
        state = PartialState(cpu=cpu_processes)
        _OWN_STATE["engine"] = "fsdp" if fsdp and cpu_processes else None
    if launched > 1 and state.num_processes != launched:
        raise RuntimeError(
            f"launched as {launched} processes (WORLD_SIZE), but they did not join one process group "
            f"(accelerate sees {state.num_processes}): they would train apart; launch with torchrun, "
            "the deepspeed launcher or accelerate launch (on CPUs: ACCELERATE_USE_CPU=true without DeepSpeed)"
        )
    return state


def _check_one_engine(config: RunConfig) -> None:
    """In several processes without GPUs the process state is made once for the run, for one engine:
    every stage trains under the same one (on GPUs each stage may name its own)."""
    from .errors import ConfigError

    def engine(stage) -> str:
        args = config.stage_args(stage)
        return "DeepSpeed" if args.get("deepspeed") else "FSDP" if args.get("fsdp") else "DDP"

    engines = {stage.name: engine(stage) for stage in config.stages}
    if len(set(engines.values())) > 1:
        listed = ", ".join(f"{name}: {e}" for name, e in engines.items())
        raise ConfigError(
            f"config.stages: in several processes without GPUs every stage trains under one engine "
            f"(set deepspeed or fsdp in config.training, not per stage); these stages differ ({listed})"
        )


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
    _OWN_STATE["engine"] = "deepspeed"
    return state


__all__ = ["distributed_state", "exit_launched_process", "forget_own_state", "training_arguments"]
