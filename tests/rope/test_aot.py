"""The M-RoPE kernel compiles ahead of time for sm_80 and sm_90 without spilling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clinkd_kernels.aot import MAX_SHARED_PER_BLOCK, compile_module_specs

MODULE = "clinkd_kernels.rope.launch"


@pytest.fixture(scope="module")
def reports():
    return compile_module_specs(MODULE)


def test_every_config_compiles_without_spills(reports):
    from clinkd_kernels.rope.launch import aot_specs

    assert len(reports) == 2 * len(aot_specs())
    assert {r.arch for r in reports} == {80, 90}
    for r in reports:
        assert r.kernel == "mrope_rotate_kernel"
        assert r.spill_bytes == 0, r
        assert r.shared_bytes <= MAX_SHARED_PER_BLOCK[r.arch], r
        assert 0 < r.registers <= 128, r  # leaves >= 4 blocks of 4 warps per SM
        assert r.ok and r.blocks_per_sm >= 4, r


# A real launch also sees strides that are multiples of 16 (Triton specialises such integers), which
# turns the tile loads into 16-byte vectors; that form must not spill either. Compiled in a fresh
# process because this one defined the kernel for the interpreter.
_VECTORISED = r"""
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from clinkd_kernels.aot import _ptxas_usage
from clinkd_kernels.rope.launch import aot_specs
spec, arch = aot_specs()[0], int(sys.argv[1])
sig = dict(spec.signature, **{n: "constexpr" for n in spec.constexprs})
names = spec.fn.arg_names
attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items()
         if t.startswith("*") or (t == "i32" and a.startswith("s"))}
c = triton.compile(ASTSource(fn=spec.fn, signature=sig, constexprs=spec.constexprs, attrs=attrs),
                   target=GPUTarget("cuda", arch, 32),
                   options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
ptx = c.asm["ptx"]
regs, spills = _ptxas_usage(ptx, arch)
print(json.dumps(dict(regs=regs, spills=spills, v4_load="ld.global.v4" in ptx, v4_store="st.global.v4" in ptx,
                      libdevice="__nv_sinf" in ptx and "__nv_cosf" in ptx, approx="sin.approx" in ptx)))
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_vectorised_form_compiles_without_spills(arch):
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-c", _VECTORISED, str(arch)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["spills"] == 0 and 0 < r["regs"] <= 128, r
    assert r["v4_load"] and r["v4_store"], r  # 16-byte accesses for the q tiles
    assert not r["libdevice"] and not r["approx"], r  # the shared sincos (test_kernels.py), no libdevice call
