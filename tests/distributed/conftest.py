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


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    """The data set of the ``clinkd train`` multi-process tests (8 samples)."""
    return setup.tiny.make_data(tmp_path_factory.mktemp("train") / "data", 8, seed=11)


@pytest.fixture(scope="session")
def single_run(train_data, tmp_path_factory):
    """``clinkd train``'s output folder of one plain process (2 per step × 2 accumulation steps), KD from
    the store then SFT: what every 2-process run with the store is compared with."""
    from clinkd.train import load_config, run_training
    from tests.distributed.runs import run_config

    folder = tmp_path_factory.mktemp("single")
    run_training(load_config(run_config(folder, train_data, processes=1)), progress=False)
    return folder / "out"


@pytest.fixture(scope="session")
def single_online_run(train_data, tmp_path_factory):
    """The same with the online dense teacher."""
    from clinkd.train import load_config, run_training
    from tests.distributed.runs import run_config

    folder = tmp_path_factory.mktemp("single_online")
    run_training(load_config(run_config(folder, train_data, processes=1, teacher="online")), progress=False)
    return folder / "out"
