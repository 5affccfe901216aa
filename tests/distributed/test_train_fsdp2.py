"""``clinkd train`` under FSDP2 (``fully_shard`` of every decoder layer and vision block, accelerate's
FSDP plugin, fsdp_version 2) in 2 CPU processes over gloo: the KD stage from the pseudo-label store and
the SFT stage give one plain process's loss curve, kd_loss, ce_loss and final weights with the same
global batch; killed (SIGKILL) mid-KD it resumes from its sharded checkpoint (torch.distributed.checkpoint,
one file per process) to the straight run; the final folder holds the consolidated weights in the hub
layout, which ``clinkd predict`` loads. In the state transformers makes alone, FSDP on CPUs is refused."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from clinkd.cli import main
from tests.data import tiny
from tests.distributed.runs import launch, run_config, same_run, weights

FSDP2 = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT"}}


def _config(folder, data_file):
    return run_config(folder, data_file, processes=2, **FSDP2)


@pytest.fixture(scope="module")
def fsdp2(train_data, tmp_path_factory):
    """The straight run: (its output folder, what the processes printed)."""
    folder = tmp_path_factory.mktemp("fsdp2")
    done = launch(_config(folder, train_data), CLINKD_TEST_SHOW_ENGINE="1")
    return folder / "out", done.stdout


def test_fsdp2_in_two_processes_trains_like_one(fsdp2, single_run):
    out, stdout = fsdp2
    engines = [x for x in stdout.splitlines() if x.startswith("student ")]
    assert engines == ["student FSDPQwen2VLForConditionalGeneration"] * 4  # 2 stages × 2 processes
    same_run(single_run, out)
    shards = sorted(p.name for p in (out / "kd" / "checkpoint-2" / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # one shard of the weights per process


def test_a_killed_fsdp2_run_resumes_from_its_sharded_checkpoint(fsdp2, train_data, tmp_path):
    straight, _ = fsdp2
    config = _config(tmp_path, train_data)
    launch(config, "kd", 3, expect_kill=True)  # after the step-2 checkpoint
    out = tmp_path / "out"
    assert (out / "kd" / "checkpoint-2").is_dir() and not (out / "kd" / "stage.json").exists()
    launch(config)
    same_run(straight, out, tol=1e-6)


def test_the_final_folder_holds_consolidated_weights_that_predict_loads(fsdp2, single_run, tmp_path):
    out, _ = fsdp2
    final = out / "sft" / "final"
    assert sorted(p.name for p in final.glob("*.safetensors")) == ["model.safetensors"]
    got = load_file(str(final / "model.safetensors"))
    assert got.keys() == weights(single_run).keys()  # the hub layout, every tensor whole
    assert all(got[k].shape == v.shape for k, v in weights(single_run).items())
    data = tiny.make_data(tmp_path / "data", 2, seed=3)
    preds = tmp_path / "preds.jsonl"
    arguments = ["predict", "--model", str(final), "--data", str(data), "--processor", str(out / "processor")]
    assert main([*arguments, "--out", str(preds), "--max-new-tokens", "3", "--no-progress"]) == 0
    assert len(preds.read_text().splitlines()) == 2


def test_fsdp_on_cpu_processes_in_the_state_transformers_makes_is_refused_not_replaced(train_data, tmp_path):
    """Without clinkd's process state (a Trainer built in a user's own loop) accelerate runs FSDP as DDP on
    CPUs: ClinKDTrainer stops with the engine it would have used."""
    done = launch(_config(tmp_path, train_data), expect_kill=True, CLINKD_TEST_ACCELERATE_STATE="1")
    assert "FSDP was asked for, but accelerate set up MULTI_CPU" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out" / "kd" / "stage.json").exists()
