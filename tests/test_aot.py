"""The ahead-of-time compile helper itself: it must see registers, spills, shared memory and MMA."""

import pytest

from clinkd_kernels.aot import compile_module_specs
from tests import aot_sample_kernels


@pytest.fixture(scope="module")
def reports():
    return {(r.config, r.arch): r for r in compile_module_specs("tests.aot_sample_kernels")}


@pytest.mark.parametrize("arch", [80, 90])
def test_compile_reports_resources(reports, arch):
    report = reports["copy", arch]
    assert report.kernel == "copy_kernel" and report.registers > 0 and report.spill_bytes == 0 and report.ok
    assert report.hmma == 0 and report.hgmma == 0 and report.blocks_per_sm > 0


def test_matrix_instructions_per_arch(reports):
    sm80, sm90 = reports["mma", 80], reports["mma", 90]
    assert sm80.hmma > 0 and sm80.hgmma == 0
    assert sm90.hgmma > 0
    assert sm80.shared_bytes > 0


def test_interpreted_kernels_are_sent_to_a_fresh_process():
    from clinkd_kernels._dispatch import triton_interpret
    from clinkd_kernels.aot import compile_kernel

    if not triton_interpret():
        pytest.skip("only meaningful under TRITON_INTERPRET=1")
    with pytest.raises(RuntimeError, match="compile_module_specs"):
        compile_kernel(
            aot_sample_kernels.copy_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}, {"BLOCK": 128}, arch=80
        )


def test_failures_are_reported():
    with pytest.raises(RuntimeError, match="AOT compile of tests.no_such_module failed"):
        compile_module_specs("tests.no_such_module")
