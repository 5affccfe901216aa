"""Test harness shared by every op.

* ``TRITON_INTERPRET`` is decided here, before any kernel module is imported: on a machine without
  CUDA the Triton kernels run in the interpreter on CPU tensors; with CUDA they compile for the GPU.
* ``CLINKD_POISON=1`` makes every op fill its outputs with NaN before the kernel writes them.
* Every test gets a fresh random seed, printed when it fails, so failures can be replayed with
  ``CLINKD_SEED=<seed>``.
"""

import os
import random

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"
os.environ.setdefault("CLINKD_POISON", "1")

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Seed torch from a fresh random value per test (or CLINKD_SEED), reported on failure."""
    seed = int(os.environ.get("CLINKD_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    random.seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"replay with CLINKD_SEED={seeds[-1]}"))


@pytest.fixture
def interpreter():
    """Device for Triton-kernel tests: CPU tensors under the interpreter, else CUDA."""
    if INTERPRET:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    return torch.device("cuda")
