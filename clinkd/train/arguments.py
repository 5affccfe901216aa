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
    if not progress:
        kwargs["disable_tqdm"] = True
    return TrainingArguments(
        output_dir=output_dir or str(Path(config.output_dir) / stage.name),
        remove_unused_columns=False,
        label_names=["labels"],
        **kwargs,
    )


def distributed_state(config: RunConfig):
    """accelerate's process state (the one Trainer uses). Without GPUs, several launched processes join
    one gloo group (accelerate alone would leave each on its own). A DeepSpeed run takes its state from
    its training arguments, which put accelerate in DeepSpeed's mode. Launched as several processes
    (WORLD_SIZE > 1) that still did not join one group — DeepSpeed in several CPU processes, say — they
    would train apart, each on all the data: a RuntimeError says so instead."""
    import torch
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = next((s for s in config.stages if config.stage_args(s).get("deepspeed")), None)
    if deepspeed is not None:
        with tempfile.TemporaryDirectory(prefix="clinkd-state-") as scratch:
            _ = training_arguments(config, deepspeed, progress=False, output_dir=scratch).device  # sets the state up
        state = PartialState()
    else:
        state = PartialState(cpu=not torch.cuda.is_available() and launched > 1)
    if launched > 1 and state.num_processes != launched:
        hint = (
            "DeepSpeed through clinkd train needs GPUs for more than one process"
            if deepspeed is not None
            else "on CPUs launch with ACCELERATE_USE_CPU=true"
        )
        raise RuntimeError(
            f"launched as {launched} processes (WORLD_SIZE), but they did not join one process group "
            f"(accelerate sees {state.num_processes}): they would train apart; {hint}"
        )
    return state


__all__ = ["distributed_state", "training_arguments"]
