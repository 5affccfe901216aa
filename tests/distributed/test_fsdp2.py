"""FSDP2 (torch ``fully_shard``) in 2 processes on the CPU (gloo): the patched model's fused loss, run
inside the lm_head's forward, trains like one process on the whole batch — with the lm_head in the root's
group, and as its own sharded unit (outside its forward its weight is then a DTensor shard). Through
``clinkd train`` FSDP2 needs GPUs: accelerate replaces it by DDP on the CPU (benchmarks/gpu_check.sh runs it)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.common import STEPS, rank_losses, torchrun


@pytest.mark.parametrize("layout", ["root", "head"])
def test_fsdp2_trains_like_one_process(data_file, single, tmp_path, layout):
    from safetensors.torch import load_file

    out = tmp_path / "weights.safetensors"
    done = torchrun(
        "-m", "tests.distributed.fsdp2_child", data_file, out, STEPS, *(["head"] if layout == "head" else [])
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]
    per_rank = rank_losses(done.stdout)
    want_state, want_losses = single
    for step in range(STEPS):
        got = [per_rank[r][step] for r in range(2)]
        assert got == pytest.approx(want_losses[step], rel=1e-5), step
    got_state = load_file(str(out))
    assert got_state.keys() == want_state.keys()
    for name, value in want_state.items():
        torch.testing.assert_close(got_state[name], value, rtol=0, atol=2e-5, msg=name)
