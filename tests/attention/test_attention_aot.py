"""Ahead-of-time compilation of every attention kernel config for its architectures (no GPU needed):
zero spills, shared memory within the per-block limit, and tensor-core instructions in the SASS —
HMMA on sm_80, HGMMA (wgmma) on sm_90 — for the three matmul kernels."""

from __future__ import annotations

import pytest

from clinkd_kernels.aot import MAX_SHARED_PER_BLOCK, compile_module_specs
from clinkd_kernels.attention.launch import aot_specs

MATMUL_KERNELS = ("mcg_attn_fwd_kernel", "mcg_attn_bwd_dkdv_kernel", "mcg_attn_bwd_dq_kernel")


@pytest.fixture(scope="module")
def reports():
    """Every spec compiled for each of its architectures, in a fresh process (the kernels of this one may
    be defined for the interpreter)."""
    return compile_module_specs("clinkd_kernels.attention.launch")


def test_every_kernel_has_specs_for_both_archs():
    names = {(s.fn.__name__, a) for s in aot_specs() for a in s.archs}
    for name in MATMUL_KERNELS + ("mcg_attn_bwd_prep_kernel", "mcg_attn_bwd_finish_kernel"):
        assert (name, 80) in names and (name, 90) in names, name


def test_no_spills_and_shared_memory_fits(reports):
    bad = [
        f"{r.config} sm{r.arch}: {r.spill_bytes} spill bytes, {r.shared_bytes} B shared"
        for r in reports
        if r.spill_bytes or r.shared_bytes > MAX_SHARED_PER_BLOCK[r.arch]
    ]
    assert not bad, "\n".join(bad)


def test_tensor_core_instructions(reports):
    for r in reports:
        if r.kernel not in MATMUL_KERNELS:
            continue
        if r.arch == 90:
            assert r.hgmma > 0, f"{r.config}: no HGMMA in the sm_90 SASS"
        else:
            assert r.hmma > 0, f"{r.config}: no HMMA in the sm_80 SASS"


def test_the_autotuner_never_tries_a_config_that_spills_for_the_head_dim():
    from clinkd_kernels.attention import launch

    for (arch, kind, head_dim), spilling in launch.SPILLING.items():
        tuned = launch._tuned(kind, arch)
        kept = tuned.early_config_prune(tuned.configs, {}, HEAD_DIM=head_dim)
        got = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
        assert got and not got & spilling and got | spilling == set(launch.CONFIGS[arch][kind])
        assert len(tuned.early_config_prune(tuned.configs, {}, HEAD_DIM=128)) == len(launch.CONFIGS[arch][kind])
