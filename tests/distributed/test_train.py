"""``clinkd train`` under torchrun on the CPU. DDP in 2 processes (gloo): the KD stage from the
pseudo-label store (built once, by the main process) and the SFT stage give the loss curve and the
weights of one plain process with the same global batch (2 per process × 2 processes = 2 × 2
accumulation steps), within the tolerance of the reduction order; killed mid-stage (SIGKILL) it resumes
to the same curve and weights; the online dense teacher runs with gradient checkpointing; the command
as typed joins one group even without ACCELERATE_USE_CPU. DeepSpeed ZeRO-3 (DS_ACCELERATOR=cpu) at world
size 1 — every parameter still partitioned, the online teacher too — equals the plain run; in two CPU
processes DeepSpeed through the Trainer is refused (accelerate would set each process up alone); a ZeRO-3
config that would save no weights is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from clinkd.train import load_config, run_training
from tests.distributed.common import REPO, torchrun
from tests.train import setup

STEPS = 3


def _config(folder: Path, data_file: Path, *, processes: int, zero: int | None = None, **training) -> Path:
    """KD (store, curriculum) 3 steps then SFT 3 steps, global batch 4 in either layout; ``zero``: under
    DeepSpeed ZeRO at that stage (its "auto" values filled from the training arguments)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = setup.run_config(folder, data_file, kd_steps=STEPS, sft_steps=STEPS, save_steps=2)
    mapping = yaml.safe_load(path.read_text())
    mapping["training"].update(
        per_device_train_batch_size=2, gradient_accumulation_steps=2 // processes, max_grad_norm=1.0, **training
    )
    if zero is not None:
        ds = {
            "zero_optimization": {"stage": zero, "stage3_gather_16bit_weights_on_model_save": True},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_allow_untested_optimizer": True,
        }
        (folder / "ds.json").write_text(json.dumps(ds))
        # DeepSpeed's own CPU accelerator (DS_ACCELERATOR=cpu) places the model: not accelerate's CPU mode
        mapping["training"].update(deepspeed=str(folder / "ds.json"), use_cpu=False)
    path.write_text(yaml.safe_dump(mapping))
    return path


def _torchrun(config: Path, *kill, expect_kill: bool = False, **env):
    deepspeed = "deepspeed" in yaml.safe_load(config.read_text())["training"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **env)
    if not deepspeed:
        env["ACCELERATE_USE_CPU"] = "true"
    done = torchrun("-m", "tests.distributed.child", config, *kill, env=env)
    if expect_kill:
        assert done.returncode != 0, done.stdout[-2000:]
    else:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        assert "rank 0 finished" in done.stdout and "rank 1 finished" in done.stdout
    return done


def _history(out: Path, stage: str) -> list[dict]:
    return [e for e in json.loads((out / stage / "stage.json").read_text())["log_history"] if "loss" in e]


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "sft" / "final" / "model.safetensors"))


def _same_run(a: Path, b: Path, *, tol: float = 2e-4) -> None:
    for stage in ("kd", "sft"):
        ha, hb = _history(a, stage), _history(b, stage)
        assert [e["step"] for e in ha] == [e["step"] for e in hb] == list(range(1, STEPS + 1))
        for ea, eb in zip(ha, hb):
            for key in ("loss", "ce_loss") + (("kd_loss",) if stage == "kd" else ()):
                assert ea[key] == pytest.approx(eb[key], rel=tol, abs=tol), (stage, ea["step"], key, ea[key], eb[key])
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=tol, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    data_file = setup.tiny.make_data(folder / "data", 8, seed=11)
    single = folder / "single"
    run_training(load_config(_config(single, data_file, processes=1)), progress=False)
    double = folder / "double"
    _torchrun(_config(double, data_file, processes=2))
    return data_file, single / "out", double / "out"


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    _, single, double = runs
    _same_run(single, double)
    manifest = json.loads((double / "pseudo_labels" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 3  # written once (8 samples, shards of 3)


def test_a_killed_run_resumes_to_the_same_curve(runs, tmp_path):
    data_file, _, double = runs
    config = _config(tmp_path, data_file, processes=2)
    _torchrun(config, "kd", 3, expect_kill=True)  # after the step-2 checkpoint of the kd stage
    out = tmp_path / "out"
    assert (out / "kd" / "checkpoint-2").is_dir() and not (out / "kd" / "stage.json").exists()
    _torchrun(config)
    _same_run(double, out, tol=1e-6)


def test_online_dense_teacher_and_gradient_checkpointing(runs, tmp_path):
    data_file, _, _ = runs
    path = _config(tmp_path / "double", data_file, processes=2, gradient_checkpointing=True)
    mapping = yaml.safe_load(path.read_text())
    mapping["stages"][0].update(teacher="online", topk=None)
    path.write_text(yaml.safe_dump(mapping))
    _torchrun(path)
    single = _config(tmp_path / "single", data_file, processes=1, gradient_checkpointing=True)
    mapping["output_dir"] = "out"
    mapping["training"]["gradient_accumulation_steps"] = 2
    single.write_text(yaml.safe_dump(mapping))
    run_training(load_config(single), progress=False)
    _same_run(tmp_path / "single" / "out", tmp_path / "double" / "out")


def test_clinkd_train_as_typed_without_the_cpu_switch_joins_one_group(runs, tmp_path):
    """``torchrun ... -m clinkd train`` on a machine without GPUs and without ACCELERATE_USE_CPU: accelerate
    alone would leave each process on its own (two trainings on all the data, no error); clinkd's run
    asks for the CPU process group itself, so the run is the DDP one."""
    data_file, _, double = runs
    config = _config(tmp_path, data_file, processes=2)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = torchrun("-m", "clinkd", "train", "--config", config, "--no-progress", env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    _same_run(double, tmp_path / "out", tol=1e-6)


def test_launched_processes_outside_one_group_are_refused(tmp_path, monkeypatch):
    """This process's accelerate state holds one process; told (WORLD_SIZE) that it is one of two, the
    run refuses to start rather than train apart."""
    from accelerate import PartialState

    PartialState()
    data_file = setup.tiny.make_data(tmp_path / "data", 4, seed=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="did not join one process group"):
        run_training(load_config(_config(tmp_path, data_file, processes=2)), progress=False)
    assert not (tmp_path / "out").exists()


def _plain(path: Path, out: Path) -> Path:
    """The config at ``path`` without DeepSpeed, writing to ``out``."""
    mapping = yaml.safe_load(path.read_text())
    mapping["output_dir"] = str(out)
    for key in ("deepspeed", "ddp_backend"):
        mapping["training"].pop(key, None)
    mapping["training"]["use_cpu"] = True
    plain = path.parent / "plain.yaml"
    plain.write_text(yaml.safe_dump(mapping))
    return plain


@pytest.mark.parametrize("teacher", ["store", "online"])
def test_zero3_through_clinkd_train_at_world_size_1(runs, tmp_path, extensions, teacher):
    """One process under ZeRO-3 still partitions every parameter (the lm_head a placeholder outside its
    forward): the student's fused loss and, with the online dense teacher, the teacher's own inference
    engine give the plain run's curve and weights."""
    data_file, _, _ = runs
    path = _config(tmp_path, data_file, processes=2, zero=3)  # per-device 2, no accumulation
    mapping = yaml.safe_load(path.read_text())
    if teacher == "online":
        mapping["stages"][0].update(teacher="online", topk=None)
    path.write_text(yaml.safe_dump(mapping))
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=extensions,
        CLINKD_TEST_SHOW_ENGINE="1",
        CLINKD_TEST_SHOW_TEACHER="1",
    )
    done = torchrun("-m", "tests.distributed.child", path, env=env, processes=1)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]
    assert [x for x in done.stdout.splitlines() if x.startswith("student ")] == ["student DeepSpeedEngine"] * 2
    if teacher == "online":
        assert "teacher DeepSpeedEngine lm_head elements 0; student DeepSpeedEngine" in done.stdout
    run_training(load_config(_plain(path, tmp_path / "plain")), progress=False)
    _same_run(tmp_path / "plain", tmp_path / "out")  # DeepSpeed reduces in its own order: ~1e-5


def test_deepspeed_in_several_cpu_processes_is_refused(runs, tmp_path, extensions):
    data_file, _, _ = runs
    path = _config(tmp_path, data_file, processes=2, zero=3)
    env = dict(
        os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=extensions
    )
    done = torchrun("-m", "clinkd", "train", "--config", path, "--no-progress", env=env)
    assert done.returncode != 0
    assert "did not join one process group" in done.stderr and "needs GPUs" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out" / "kd").exists()


def test_a_zero3_config_that_saves_no_weights_is_refused(tmp_path, capsys):
    from clinkd.cli import main

    data_file = setup.tiny.make_data(tmp_path / "data", 4, seed=1)
    path = _config(tmp_path, data_file, processes=1, zero=3)
    ds = json.loads((tmp_path / "ds.json").read_text())
    del ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "config.training.deepspeed" in err or ".deepspeed: a ZeRO-3 config needs" in err, err
    assert "stage3_gather_16bit_weights_on_model_save" in err and err.count("\n") == 1


def test_fsdp_on_cpu_processes_is_refused_not_replaced(runs, tmp_path):
    """accelerate would run FSDP as DDP on CPUs: the run stops with the engine it would have used."""
    data_file, _, _ = runs
    path = _config(tmp_path, data_file, processes=2, fsdp="full_shard")
    done = _torchrun(path, expect_kill=True)
    assert "FSDP was asked for, but accelerate set up MULTI_CPU" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out" / "kd" / "stage.json").exists()
