"""FSDP2 (torch ``fully_shard``) in 2 processes on the CPU (gloo): the patched model's fused loss, run
inside the lm_head's forward, trains like one process on the whole batch — with the lm_head in the root's
group, and as its own sharded unit (outside its forward its weight is then a DTensor shard). Through
``clinkd train`` FSDP2 needs GPUs: accelerate replaces it by DDP on the CPU (benchmarks/gpu_check.sh runs it)."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.fsdp2_common import reference
from tests.train import setup

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return setup.tiny.make_data(tmp_path_factory.mktemp("fsdp2") / "data", 8, seed=5)


@pytest.fixture(scope="module")
def single(data_file):
    return reference(data_file, STEPS)


@pytest.mark.parametrize("layout", ["root", "head"])
def test_fsdp2_trains_like_one_process(data_file, single, tmp_path, layout):
    from safetensors.torch import load_file

    out = tmp_path / "weights.safetensors"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
               "-m", "tests.distributed.fsdp2_child", str(data_file), str(out), str(STEPS)] + (
        ["head"] if layout == "head" else [])
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("losses "))
    per_rank = ast.literal_eval(line[len("losses "):])
    want_state, want_losses = single
    for step in range(STEPS):
        got = [per_rank[r][step] for r in range(2)]
        assert got == pytest.approx(want_losses[step], rel=1e-5), step
    got_state = load_file(str(out))
    assert got_state.keys() == want_state.keys()
    for name, value in want_state.items():
        torch.testing.assert_close(got_state[name], value, rtol=0, atol=2e-5, msg=name)
