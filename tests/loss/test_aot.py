"""The loss kernel compiles ahead of time for sm_80 and sm_90 without spills (no GPU needed).

Compiled in a fresh process (``compile_module_specs``): this one defined the kernel for the interpreter.
"""

from __future__ import annotations

import pytest

from clinkd_kernels.aot import MAX_SHARED_PER_BLOCK, compile_module_specs

MODULE = "clinkd_kernels.loss.launch"


@pytest.fixture(scope="module")
def reports():
    return compile_module_specs(MODULE)


def test_every_config_compiles_without_spills(reports):
    from clinkd_kernels.loss.launch import aot_specs

    specs = aot_specs()
    assert len(reports) == 2 * len(specs)
    assert {r.arch for r in reports} == {80, 90}
    assert {r.config for r in reports} == {s.label for s in specs}
    for r in reports:
        assert r.kernel == "kd_rows_kernel"
        assert r.spill_bytes == 0, r
        assert r.shared_bytes <= MAX_SHARED_PER_BLOCK[r.arch], r
        assert 0 < r.registers <= 128, r  # 8 warps: >= 2 blocks (16 warps) per SM
        assert r.ok and r.blocks_per_sm >= 2, r
