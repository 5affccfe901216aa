"""DeepSpeed ZeRO-2 and ZeRO-3 in 2 processes on the CPU (DS_ACCELERATOR=cpu, gloo): the patched model's
fused loss trains like one process on the whole batch. Under ZeRO-3 the lm_head's weight is an empty
placeholder outside its forward; the fused loss runs inside it (``clinkd.patch.call_in_forward``), gets
the gathered weight and hands its gradient back through DeepSpeed's hooks."""

from __future__ import annotations

import os

import deepspeed  # noqa: F401  (installed by the test extra; the test fails without it)
import pytest
import torch

from tests.distributed.common import REPO, STEPS, rank_losses, torchrun


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_like_one_process(data_file, single, extensions, tmp_path, stage):
    from safetensors.torch import load_file

    out = tmp_path / "weights.safetensors"
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=str(extensions),
    )
    done = torchrun("-m", "tests.distributed.zero_child", data_file, out, STEPS, stage, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    assert ("misuse refused: " in done.stdout) == (stage == 3)  # a clear error, not a kernel's shape error
    per_rank = rank_losses(done.stdout)
    want_state, want_losses = single
    for step in range(STEPS):
        assert [per_rank[r][step] for r in range(2)] == pytest.approx(want_losses[step], rel=1e-5), step
    got_state = load_file(str(out))  # the parameters (the reference's state also holds buffers)
    assert "lm_head.weight" in got_state and set(got_state) <= set(want_state)
    for name, value in got_state.items():
        torch.testing.assert_close(value, want_state[name], rtol=0, atol=2e-5, msg=name)
