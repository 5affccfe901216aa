"""Ahead-of-time compilation of Triton kernels for sm_80 / sm_90 on a machine without a GPU.

Triton compiles to PTX and then to a cubin with the ``ptxas`` it ships; no device is needed for
that. From the cubin we read what decides speed before anything runs: registers per thread, spill
bytes, shared memory, occupancy and the matrix instructions in the SASS (HMMA on sm_80, HGMMA on
sm_90). Every kernel issue uses this; ``python -m clinkd_kernels.report`` tabulates it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch

ARCHS = (80, 90)
# Hardware limits per SM (CUDA programming guide, compute capabilities 8.0 and 9.0).
MAX_SHARED_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048

_TRITON_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


def pointer(dtype: torch.dtype) -> str:
    """Triton signature string for a pointer to ``dtype`` (e.g. ``*fp16``)."""
    return "*" + _TRITON_DTYPES[dtype]


def kernel_arguments(fn) -> list[tuple[str, bool]]:
    """(name, is constexpr) of every argument of a ``@triton.jit`` function, autotuned or not, compiled
    or defined under the interpreter."""
    base = fn
    while not hasattr(base, "params") and type(base).__name__ != "InterpretedFunction" and hasattr(base, "fn"):
        base = base.fn  # autotune / heuristics wrappers
    if hasattr(base, "params"):  # JITFunction
        return [(p.name, bool(p.is_constexpr)) for p in base.params]
    import inspect

    raw = base.fn if hasattr(base, "fn") else base
    return [(name, "constexpr" in str(param.annotation)) for name, param in inspect.signature(raw).parameters.items()]


def kernel_signature(fn, pointers: dict[str, torch.dtype], *, floats: tuple[str, ...] = ()) -> dict[str, str]:
    """The Triton signature of ``fn``'s runtime arguments, read from the kernel itself: each name in
    ``pointers`` is a pointer to that dtype, each name in ``floats`` an fp32 scalar, every other
    non-constexpr argument an i32 scalar (what the JIT picks for a Python int below 2^31). A name
    that is not an argument of ``fn`` is an error, so a spec cannot drift from the kernel it compiles."""
    arguments = kernel_arguments(fn)
    runtime = [name for name, is_constexpr in arguments if not is_constexpr]
    unknown = sorted((set(pointers) | set(floats)) - set(runtime))
    if unknown:
        raise ValueError(f"{unknown} are not runtime arguments of the kernel (it takes {runtime})")
    return {
        name: pointer(pointers[name]) if name in pointers else "fp32" if name in floats else "i32" for name in runtime
    }


@dataclasses.dataclass
class CompileReport:
    kernel: str
    arch: int
    config: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    num_warps: int
    blocks_per_sm: int
    hmma: int
    hgmma: int

    @property
    def ok(self) -> bool:
        return self.spill_bytes == 0 and self.shared_bytes <= MAX_SHARED_PER_BLOCK[self.arch]


def _nvidia_bin(tool: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{tool} not found at {path}; this triton install ships no NVIDIA tools")
    return path


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) as ptxas reports them for ``ptx`` on ``sm_<arch>``."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [_nvidia_bin("ptxas"), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.o")],
            capture_output=True,
            text=True,
            check=True,
        )
    text = out.stderr + out.stdout
    regs = max((int(m) for m in re.findall(r"Used (\d+) registers", text)), default=0)
    spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text))
    return regs, spills


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [_nvidia_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout


def compile_kernel(
    fn,
    signature: dict[str, str],
    constexprs: dict[str, object],
    *,
    arch: int,
    num_warps: int = 4,
    num_stages: int = 3,
    config: str = "",
) -> CompileReport:
    """Compile the ``@triton.jit`` function ``fn`` for ``sm_<arch>`` and report its resources.

    ``signature`` maps every argument name to a Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``,
    or ``"constexpr"``); ``constexprs`` gives the value of each constexpr argument.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    base = fn
    while not isinstance(base, JITFunction):
        if type(base).__name__ == "InterpretedFunction":
            raise RuntimeError(
                f"{base.fn.__name__} was defined under TRITON_INTERPRET=1 and cannot be compiled "
                "in this process; use compile_module_specs(), which compiles in a fresh one"
            )
        base = base.fn  # autotune / heuristics wrappers hold the JITFunction in .fn
    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    missing = [a for a in base.arg_names if a not in sig]
    if missing:
        raise ValueError(f"signature of {base.__name__} lacks {missing}")
    # Pointers get the 16-byte alignment hint the JIT gives real tensors, so the vector widths (and
    # so the register counts) are the ones a launch would compile to.
    attrs = {(base.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items() if t.startswith("*")}
    src = ASTSource(fn=base, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    regs, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    sass = _sass(compiled.asm["cubin"])
    shared = int(compiled.metadata.shared)
    threads = num_warps * 32
    by_regs = REGS_PER_SM // max(1, regs * threads)
    by_threads = MAX_THREADS_PER_SM // threads
    by_shared = MAX_SHARED_PER_BLOCK[arch] // shared if shared else by_threads
    return CompileReport(
        kernel=base.__name__,
        arch=arch,
        config=config or f"warps={num_warps},stages={num_stages}",
        registers=regs,
        spill_bytes=spills,
        shared_bytes=shared,
        num_warps=num_warps,
        blocks_per_sm=max(0, min(by_regs, by_threads, by_shared)),
        hmma=len(re.findall(r"\bHMMA\.", sass)),
        hgmma=len(re.findall(r"\bHGMMA\.", sass)),
    )


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One compile configuration of a Triton kernel, as an op module lists it in ``aot_specs()``.

    ``signature`` maps non-constexpr arguments to Triton types; ``constexprs`` gives constexpr values.
    ``archs`` are the architectures the configuration is meant for (an sm_90 autotune config need
    not fit an sm_80 register file).
    """

    fn: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    archs: tuple = ARCHS

    def compile(self, arch: int) -> CompileReport:
        return compile_kernel(
            self.fn,
            self.signature,
            self.constexprs,
            arch=arch,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
            config=self.label,
        )


def compile_module_specs(module: str, archs=ARCHS) -> list[CompileReport]:
    """Compile every ``KernelSpec`` of ``module.aot_specs()`` for each of ``archs`` it is meant for.

    Runs in a fresh Python process with ``TRITON_INTERPRET=0``, so it also works from a process whose
    kernels were defined for the interpreter (the test suite on a machine without a GPU).
    """
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "clinkd_kernels.aot", module, *map(str, archs)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"AOT compile of {module} failed:\n{out.stderr[-4000:]}")
    return [CompileReport(**row) for row in json.loads(out.stdout)]


def _compile_job(job) -> dict:
    module, index, arch = job
    return dataclasses.asdict(importlib.import_module(module).aot_specs()[index].compile(arch))


def _main(argv: list[str]) -> int:
    module, archs = argv[0], [int(a) for a in argv[1:]] or list(ARCHS)
    specs = importlib.import_module(module).aot_specs()
    jobs = [(module, i, arch) for i, spec in enumerate(specs) for arch in archs if arch in spec.archs]
    # Independent, CPU-bound compiles (ptxas): one process per core, at most two.
    with ProcessPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        json.dump(list(pool.map(_compile_job, jobs)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
