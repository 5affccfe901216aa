"""Shared pieces of the rct tests: a run config with an rct stage."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.train import setup

ROUNDS = 2


def rct_config(folder: Path, data_file: Path) -> Path:
    """SFT 2 steps, then 2 RCT rounds of 2 steps each (checkpoints every step), 3 questions per batch,
    2 candidates per wrong answer, corrections joining the data."""
    path = setup.run_config(folder, data_file, save_steps=1)
    mapping = yaml.safe_load(path.read_text())
    del mapping["models"]["teacher"]
    mapping["stages"] = [
        {"name": "sft", "type": "sft", "training": {"max_steps": 2}},
        {
            "name": "rct",
            "type": "rct",
            "rounds": ROUNDS,
            "every": "steps",
            "steps": 2,
            "batch_size": 3,
            "max_new_tokens": 6,
            "candidates": 2,
            "mode": "join",
        },
    ]
    path.write_text(yaml.safe_dump(mapping))
    return path
