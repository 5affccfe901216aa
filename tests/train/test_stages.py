"""KD stage then SFT stage through ``clinkd train``: the loss goes down, logs carry the KD and CE
parts, and a run killed mid-stage resumes from its checkpoint to the same final weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clinkd.cli import main
from clinkd.data import model_inputs
from clinkd.train import build_model, load_config, prepare_run
from tests.train import setup

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted run: KD (store, curriculum) 4 steps, then SFT 4 steps; checkpoints every 2."""
    folder = tmp_path_factory.mktemp("straight")
    data_file = setup.tiny.make_data(folder / "data", 8, seed=11)
    config = setup.run_config(folder, data_file)
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    return folder, config, data_file


def _mean_ce(model, prepared) -> float:
    batch = prepared.collator([prepared.dataset[i] for i in range(len(prepared.dataset))])
    model.eval()
    with torch.no_grad():
        return float(model(**model_inputs(model, batch), return_logits=False).loss)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "sft" / "final" / "model.safetensors"))


def test_kd_then_sft_lowers_the_loss(straight_run):
    folder, config_path, _ = straight_run
    config = load_config(config_path)
    prepared = prepare_run(config)
    initial = build_model(config.student, prepared.model_configs["student"], seed=config.seed)
    from transformers import AutoModelForImageTextToText

    from clinkd.patch import patch_qwen2_vl

    trained = patch_qwen2_vl(
        AutoModelForImageTextToText.from_pretrained(str(folder / "out" / "sft" / "final")), attention=False
    )
    before, after = _mean_ce(initial, prepared), _mean_ce(trained, prepared)
    assert after < before - 0.3, (before, after)

    kd_log = json.loads((folder / "out" / "kd" / "stage.json").read_text())["log_history"]
    sft_log = json.loads((folder / "out" / "sft" / "stage.json").read_text())["log_history"]
    steps = [h for h in kd_log if "loss" in h]
    assert len(steps) == 4 and all({"kd_loss", "ce_loss", "kd_fraction"} <= set(h) for h in steps)
    assert [h["kd_fraction"] for h in steps] == pytest.approx([0.75, 1.0, 1.0, 1.0])
    for h in steps:  # the logged total is the configured mix of the logged parts
        assert h["loss"] == pytest.approx((0.5 * h["kd_loss"] + 1.0 * h["ce_loss"]) / 1.5, rel=1e-4)
    sft_steps = [h for h in sft_log if "loss" in h]
    assert len(sft_steps) == 4 and all("ce_loss" in h and "kd_loss" not in h for h in sft_steps)
    assert (folder / "out" / "pseudo_labels" / "manifest.json").is_file()


@pytest.mark.parametrize("stage, step", [("kd", 3), ("sft", 1)])
def test_killed_run_resumes_to_the_same_weights(straight_run, tmp_path, stage, step):
    """Killed (SIGKILL) in the KD stage after its step-2 checkpoint: resumes from it. Killed in the SFT
    stage before its first checkpoint: the complete KD stage is skipped (student loaded from its
    final folder) and SFT restarts. Either way the final weights are those of the straight run."""
    folder, _, data_file = straight_run
    config = setup.run_config(tmp_path, data_file)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.run(
        [sys.executable, "-m", "tests.train.kill_child", str(config), stage, str(step)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr[-3000:]
    stage_dir = tmp_path / "out" / stage
    assert not (stage_dir / "stage.json").exists()
    before = None
    if stage == "kd":
        assert (stage_dir / "checkpoint-2").is_dir()
        before = json.loads((stage_dir / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    else:
        assert (tmp_path / "out" / "kd" / "stage.json").is_file() and not list(stage_dir.glob("checkpoint-*"))
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    resumed = json.loads((stage_dir / "stage.json").read_text())["log_history"]
    assert [h["step"] for h in resumed if "loss" in h] == [1, 2, 3, 4]
    if before is not None:  # continued from checkpoint-2 (its history kept), not restarted
        assert resumed[:2] == before
    want, got = _weights(folder / "out"), _weights(tmp_path / "out")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_distill_cache_command_builds_then_reuses_the_store(tmp_path, capsys):
    data_file = setup.tiny.make_data(tmp_path / "data", 5, seed=4)
    config = setup.run_config(tmp_path, data_file)
    assert main(["distill", "cache", "--config", str(config), "--no-progress"]) == 0
    store = tmp_path / "out" / "pseudo_labels"
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["meta"]["k"] == 6 and manifest["meta"]["temperature"] == 0.8
    assert sum(len(s["samples"]) for s in manifest["shards"]) == 5
    stamp = (store / "manifest.json").stat().st_mtime_ns
    assert main(["distill", "cache", "--config", str(config), "--no-progress"]) == 0  # complete: nothing to do
    assert (store / "manifest.json").stat().st_mtime_ns == stamp
    assert "kd: " in capsys.readouterr().out
    assert main(["distill", "cache", "--config", str(config), "--stage", "sft"]) == 2


def test_offline_processor_is_saved_whole(tmp_path):
    """A processor folder left by an interrupted save (files, but no processor_config.json) is replaced
    by a complete one; a complete one is reused as it is; no staging folder is left behind."""
    from clinkd.train.artifacts import build_processor

    config = load_config(setup.run_config(tmp_path, setup.tiny.make_data(tmp_path / "data", 4, seed=3)))
    saved = Path(config.output_dir) / "processor"
    saved.mkdir(parents=True)
    (saved / "tokenizer.json").write_text("{truncated")
    processor = build_processor(config)
    assert (saved / "processor_config.json").is_file() and "{truncated" not in (saved / "tokenizer.json").read_text()
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".processor-")] == []
    again = build_processor(config)
    assert len(again.tokenizer) == len(processor.tokenizer)
