"""Packaging: the kernels need torch, triton and numpy only; the model layer is the extra ``hf``, whose
transformers window is the one ``clinkd.patch`` states; importing ``clinkd`` without it says what to install."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def _setup_functions() -> dict:
    """setup.py's helper functions (the file itself builds the extension when run)."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    functions = [
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("_transformers_window", "_extras")
    ]
    namespace = {"ast": ast, "os": os, "HERE": str(ROOT)}
    exec(compile(ast.Module(functions, []), "setup.py", "exec"), namespace)
    return namespace


def test_the_hf_extra_takes_the_window_of_the_patch():
    from clinkd.patch import SUPPORTED_TRANSFORMERS

    extras = _setup_functions()["_extras"]()
    assert extras["hf"][0] == "transformers" + ",".join(SUPPORTED_TRANSFORMERS)
    assert {"accelerate>=1.1", "pillow", "safetensors", "pyyaml", "tqdm"} <= set(extras["hf"])
    for name in ("test", "demo", "eval", "bench"):
        assert set(extras["hf"]) <= set(extras[name]), name
    assert {"pytest>=8", "pycocoevalcap", "pydicom", "matplotlib"} <= set(extras["test"])
    assert "flash-attn>=2.6" in extras["flash"]


def test_the_kernels_need_torch_triton_numpy_only():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert sorted(d.split(">")[0].split("=")[0] for d in project["dependencies"]) == ["numpy", "torch", "triton"]
    assert project["dynamic"] == ["optional-dependencies"] and "optional-dependencies" not in project
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License\n                           Version 2.0")


def test_the_kernels_import_without_transformers():
    done = _python("import sys, clinkd_kernels; assert 'transformers' not in sys.modules")
    assert done.returncode == 0, done.stderr


def test_the_model_layer_without_transformers_says_what_to_install():
    done = _python(
        "import importlib.util as u\n"
        "find = u.find_spec\n"
        "u.find_spec = lambda name, *a: None if name == 'transformers' else find(name, *a)\n"
        "import clinkd\n"
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and "transformers" in last and "pip install 'clinkd[hf]'" in last, last
