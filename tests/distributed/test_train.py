"""``clinkd train`` under torchrun on the CPU. DDP in 2 processes (gloo): the KD stage from the
pseudo-label store (built once, by the main process) and the SFT stage give the loss curve and the
weights of one plain process with the same global batch (2 per process × 2 processes = 2 × 2
accumulation steps), within the tolerance of the reduction order; killed mid-stage (SIGKILL) it resumes
to the same curve and weights; the online dense teacher runs with gradient checkpointing; the command
as typed joins one group even without ACCELERATE_USE_CPU; processes that did not join one group are
refused. DeepSpeed: test_train_zero.py; FSDP2: test_train_fsdp2.py."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from clinkd.train import load_config, run_training
from tests.distributed.common import REPO, torchrun
from tests.distributed.runs import launch, run_config, same_run
from tests.train import setup


@pytest.fixture(scope="module")
def double(train_data, tmp_path_factory):
    """The 2-process DDP run's output folder."""
    folder = tmp_path_factory.mktemp("ddp")
    launch(run_config(folder, train_data, processes=2))
    return folder / "out"


def test_two_processes_train_like_one_with_the_same_global_batch(single_run, double):
    same_run(single_run, double)
    manifest = json.loads((double / "pseudo_labels" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 3  # written once (8 samples, shards of 3)


def test_a_killed_run_resumes_to_the_same_curve(train_data, double, tmp_path):
    config = run_config(tmp_path, train_data, processes=2)
    launch(config, "kd", 3, expect_kill=True)  # after the step-2 checkpoint of the kd stage
    out = tmp_path / "out"
    assert (out / "kd" / "checkpoint-2").is_dir() and not (out / "kd" / "stage.json").exists()
    launch(config)
    same_run(double, out, tol=1e-6)


def test_online_dense_teacher_and_gradient_checkpointing(train_data, tmp_path):
    path = run_config(tmp_path / "double", train_data, processes=2, teacher="online", gradient_checkpointing=True)
    launch(path)
    single = run_config(tmp_path / "single", train_data, processes=1, teacher="online", gradient_checkpointing=True)
    run_training(load_config(single), progress=False)
    same_run(tmp_path / "single" / "out", tmp_path / "double" / "out")


def test_clinkd_train_as_typed_without_the_cpu_switch_joins_one_group(train_data, double, tmp_path):
    """``torchrun ... -m clinkd train`` on a machine without GPUs and without ACCELERATE_USE_CPU: accelerate
    alone would leave each process on its own (two trainings on all the data, no error); clinkd's run
    asks for the CPU process group itself, so the run is the DDP one."""
    config = run_config(tmp_path, train_data, processes=2)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = torchrun("-m", "clinkd", "train", "--config", config, "--no-progress", env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    same_run(double, tmp_path / "out", tol=1e-6)


def test_launched_processes_outside_one_group_are_refused(tmp_path, monkeypatch):
    """This process's accelerate state holds one process; told (WORLD_SIZE) that it is one of two, the
    run refuses to start rather than train apart."""
    from accelerate import PartialState

    PartialState()
    data_file = setup.tiny.make_data(tmp_path / "data", 4, seed=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="did not join one process group"):
        run_training(load_config(run_config(tmp_path, data_file, processes=2)), progress=False)
    assert not (tmp_path / "out").exists()


def test_stages_under_different_engines_on_cpu_processes_are_refused(tmp_path, monkeypatch):
    """Without GPUs the process state is made once, for one engine: a run whose stages name different
    engines is refused before anything starts, naming each stage's."""
    from clinkd.train import ConfigError

    data_file = setup.tiny.make_data(tmp_path / "data", 4, seed=1)
    path = run_config(tmp_path, data_file, processes=2)
    mapping = yaml.safe_load(path.read_text())
    mapping["stages"][1]["training"]["fsdp"] = "full_shard"
    path.write_text(yaml.safe_dump(mapping))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"every stage trains under one engine .*kd: DDP, sft: FSDP"):
        run_training(load_config(path), progress=False)
    assert not (tmp_path / "out").exists()
