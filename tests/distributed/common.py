"""What the multi-process tests share: a free port, the torchrun command, and for the FSDP2 and DeepSpeed
tests the model, the batches and the single-process reference."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from clinkd.data import build_dataset
from clinkd.patch import patch_qwen2_vl
from tests.data import tiny
from tests.train import setup

REPO = Path(__file__).resolve().parents[2]
STEPS = 3  # optimizer steps of the FSDP2 and DeepSpeed runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, env: dict | None = None, processes: int = 2, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node PROCESSES ARGS`` from the repository root (one thread
    per process: the processes share the CPU)."""
    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1") if env is None else env
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(free_port()),
        *map(str, args),
    ]
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)


def model():
    """The tiny student (seeded), patched: MCG-RoPE positions, fused loss (attention unfused: head_dim 16)."""
    return patch_qwen2_vl(setup.student(seed=3), attention=False)


def batches(data_file, world: int):
    """Every step's batch of 2·world samples, cut into ``world`` halves (forward inputs with labels)."""
    data = build_dataset(data_file, tiny.processor(), max_length=512)
    collate = tiny.collator()
    per = 2
    step = 0
    while True:
        index = [(step * per * world + i) % len(data) for i in range(per * world)]
        halves = []
        for r in range(world):
            batch = collate([data[i] for i in index[r * per : (r + 1) * per]])
            halves.append({k: v for k, v in batch.items() if k != "sample_index"})
        yield halves
        step += 1


def reference(data_file, steps: int, world: int = 2) -> tuple[dict, list[float]]:
    """One process: the same model and steps, the loss the mean of the halves' losses."""
    student = model()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses = []
    for _, halves in zip(range(steps), batches(data_file, world)):
        parts = [student(**h).loss for h in halves]
        (sum(parts) / len(parts)).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append([float(p) for p in parts])
    return {k: v.detach().clone() for k, v in student.state_dict().items()}, losses


def rank_losses(stdout: str) -> list[list[float]]:
    """The per-rank losses a child printed (``losses [[...], [...]]``)."""
    import ast

    line = next(x for x in stdout.splitlines() if x.startswith("losses "))
    return ast.literal_eval(line[len("losses ") :])
