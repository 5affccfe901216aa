"""Fixtures of the multi-process tests: the data set and the single-process reference of the FSDP2 and
DeepSpeed tests, and DeepSpeed's extension folder."""

import pytest

from tests.distributed.common import STEPS, reference
from tests.train import setup


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return setup.tiny.make_data(tmp_path_factory.mktemp("engines") / "data", 8, seed=5)


@pytest.fixture(scope="module")
def single(data_file):
    """The weights and per-half losses of one process over STEPS steps."""
    return reference(data_file, STEPS)


@pytest.fixture(scope="session")
def extensions(tmp_path_factory):
    """DeepSpeed compiles its CPU communication module once per folder: one folder for every DeepSpeed run."""
    return str(tmp_path_factory.mktemp("torch_extensions"))
