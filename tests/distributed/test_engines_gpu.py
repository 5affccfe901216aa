"""``clinkd train`` through ``accelerate launch`` with the example configs of docs/examples/distributed/ on
one GPU (FSDP2 and DeepSpeed ZeRO-2/3 still shard, or partition, every parameter with one process):
the KD stage from the store and the SFT stage finish with finite losses and a final model that loads.
On the CPU accelerate turns FSDP into DDP, so these run on a GPU only (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train import setup

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples" / "distributed"


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero2", "zero3"])
def test_clinkd_train_under_each_engine_on_one_gpu(tmp_path, engine):
    data_file = setup.tiny.make_data(tmp_path / "data", 8, seed=3)
    config = setup.run_config(tmp_path, data_file, kd_steps=2, sft_steps=2)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(EXAMPLES / f"{engine}.yaml"),
        "--num_processes",
        "1",
        "-m",
        "clinkd",
        "train",
        "--config",
        str(config),
        "--no-progress",
        "--set",
        "training.use_cpu=false",
    ]
    done = subprocess.run(
        command, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-5000:]
    for stage in ("kd", "sft"):
        history = json.loads((tmp_path / "out" / stage / "stage.json").read_text())["log_history"]
        assert all(math.isfinite(e["loss"]) for e in history if "loss" in e)
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(str(tmp_path / "out" / "sft" / "final"))
