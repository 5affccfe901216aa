"""``clinkd train`` under DeepSpeed on the CPU (DS_ACCELERATOR=cpu, gloo). In 2 processes under ZeRO-2 and
ZeRO-3 the KD stage from the pseudo-label store and the SFT stage give one plain process's loss curve,
kd_loss, ce_loss and final weights with the same global batch; a ZeRO-3 run killed (SIGKILL) mid-KD
resumes from its sharded checkpoint to the straight run, and its consolidated final folder is what
``clinkd predict`` loads; the online dense teacher in its own partitioned inference engine equals one
process too; so does the deepspeed launcher as typed. At world size 1 every parameter is still
partitioned. A ZeRO-3 config that would save no weights is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from clinkd.cli import main
from clinkd.train import load_config, run_training
from tests.data import tiny
from tests.distributed.common import REPO, free_port
from tests.distributed.runs import launch, plain, run_config, same_run, weights
from tests.train import setup

SHOW = {"CLINKD_TEST_SHOW_ENGINE": "1", "CLINKD_TEST_SHOW_TEACHER": "1"}


def _engines(stdout: str) -> list[str]:
    return [x for x in stdout.splitlines() if x.startswith("student ")]


@pytest.fixture(scope="module")
def zero3(train_data, extensions, tmp_path_factory):
    """The straight 2-process ZeRO-3 run: (its config, its output folder, what the processes printed)."""
    folder = tmp_path_factory.mktemp("zero3")
    config = run_config(folder, train_data, processes=2, zero=3)
    done = launch(config, extensions=extensions, **SHOW)
    return config, folder / "out", done.stdout


def test_zero3_in_two_processes_trains_like_one(zero3, single_run):
    _, out, stdout = zero3
    assert _engines(stdout) == ["student DeepSpeedEngine"] * 4  # 2 stages × 2 processes
    same_run(single_run, out)
    checkpoint = out / "kd" / "checkpoint-2" / "global_step2"
    shards = sorted(p.name for p in checkpoint.iterdir())
    assert [s for s in shards if "optim_states" in s] == [
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)
    ]


def test_zero2_in_two_processes_trains_like_one(train_data, extensions, single_run, tmp_path):
    launch(run_config(tmp_path, train_data, processes=2, zero=2), extensions=extensions)
    same_run(single_run, tmp_path / "out")


def test_a_killed_zero3_run_resumes_from_its_sharded_checkpoint(zero3, train_data, extensions, tmp_path):
    _, straight, _ = zero3
    config = run_config(tmp_path, train_data, processes=2, zero=3)
    launch(config, "kd", 3, expect_kill=True, extensions=extensions)  # after the step-2 checkpoint
    out = tmp_path / "out"
    assert (out / "kd" / "checkpoint-2" / "global_step2").is_dir() and not (out / "kd" / "stage.json").exists()
    launch(config, extensions=extensions)
    same_run(straight, out, tol=1e-6)


def test_the_final_folder_holds_consolidated_weights_that_predict_loads(zero3, single_run, tmp_path, capsys):
    _, out, _ = zero3
    final = out / "sft" / "final"
    assert sorted(p.name for p in final.glob("*.safetensors")) == ["model.safetensors"]
    got = load_file(str(final / "model.safetensors"))
    assert got.keys() == weights(single_run).keys() and all(t.numel() > 0 for t in got.values())
    data = tiny.make_data(tmp_path / "data", 2, seed=3)
    preds = tmp_path / "preds.jsonl"
    arguments = ["predict", "--model", str(final), "--data", str(data), "--processor", str(out / "processor")]
    assert main([*arguments, "--out", str(preds), "--max-new-tokens", "3", "--no-progress"]) == 0
    assert len(preds.read_text().splitlines()) == 2


def test_online_teacher_under_zero3_in_two_processes(train_data, extensions, single_online_run, tmp_path):
    """The teacher gets its own inference engine, partitioned like the student (its lm_head a
    placeholder outside its forward)."""
    config = run_config(tmp_path, train_data, processes=2, zero=3, teacher="online")
    done = launch(config, extensions=extensions, **SHOW)
    assert done.stdout.count("teacher DeepSpeedEngine lm_head elements 0; student DeepSpeedEngine") == 2
    same_run(single_online_run, tmp_path / "out")


@pytest.mark.parametrize("teacher", ["store", "online"])
def test_zero3_at_world_size_1(train_data, extensions, tmp_path, teacher):
    """One process under ZeRO-3 still partitions every parameter (the lm_head a placeholder outside its
    forward): the student's fused loss and, with the online dense teacher, the teacher's own inference
    engine give the plain run's curve and weights."""
    path = run_config(tmp_path, train_data, processes=2, zero=3, teacher=teacher)  # per-device 2, no accumulation
    done = launch(path, processes=1, extensions=extensions, **SHOW)
    assert _engines(done.stdout) == ["student DeepSpeedEngine"] * 2
    if teacher == "online":
        assert "teacher DeepSpeedEngine lm_head elements 0; student DeepSpeedEngine" in done.stdout
    run_training(load_config(plain(path, tmp_path / "plain")), progress=False)
    same_run(tmp_path / "plain", tmp_path / "out")  # DeepSpeed reduces in its own order: ~1e-5


def test_a_zero3_config_that_saves_no_weights_is_refused(tmp_path, capsys):
    data_file = setup.tiny.make_data(tmp_path / "data", 4, seed=1)
    path = run_config(tmp_path, data_file, processes=1, zero=3)
    ds = json.loads((tmp_path / "ds.json").read_text())
    del ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "config.training.deepspeed" in err or ".deepspeed: a ZeRO-3 config needs" in err, err
    assert "stage3_gather_16bit_weights_on_model_save" in err and err.count("\n") == 1


def test_the_deepspeed_launcher_as_typed(train_data, extensions, single_run, tmp_path):
    """``deepspeed --num_gpus 2 --no_local_rank --module clinkd train --config run.yaml`` on CPUs."""
    config = run_config(tmp_path, train_data, processes=2, zero=3)
    env = dict(
        os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=extensions
    )
    runner = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
    command = [*runner, "--no_local_rank", "--module", "clinkd", "train", "--config", str(config), "--no-progress"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    same_run(single_run, tmp_path / "out")


def test_deepspeed_on_cpu_processes_in_the_state_transformers_makes_is_refused(train_data, extensions, tmp_path):
    """In the state transformers makes alone (a Trainer built in a user's own loop) each CPU process
    counts itself alone under DeepSpeed and would train on all the data: ClinKDTrainer refuses."""
    config = run_config(tmp_path, train_data, processes=2, zero=3)
    done = launch(config, expect_kill=True, extensions=extensions, CLINKD_TEST_ACCELERATE_STATE="1")
    assert "launched as 2 processes (WORLD_SIZE), but accelerate counts 1" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out" / "kd" / "stage.json").exists()
