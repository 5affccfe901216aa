"""What the ``clinkd train`` multi-process tests share: the run config (KD from the store or online, then
SFT, global batch 4 in either layout, optionally under an engine), its launch under torchrun, and the
comparison of two runs (loss curves and final weights)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from tests.distributed.common import REPO, torchrun
from tests.train import setup

STEPS = 3  # optimizer steps of each stage


def run_config(
    folder: Path, data_file: Path, *, processes: int, zero: int | None = None, teacher: str = "store", **training
) -> Path:
    """KD (``teacher``: the store with its curriculum, or "online" dense) STEPS steps then SFT STEPS steps,
    global batch 4 in either layout (2 per process × ``processes`` × accumulation); ``zero``: under
    DeepSpeed ZeRO at that stage (its "auto" values filled from the training arguments); ``training``:
    more TrainingArguments keywords."""
    folder.mkdir(parents=True, exist_ok=True)
    path = setup.run_config(folder, data_file, kd_steps=STEPS, sft_steps=STEPS, save_steps=2)
    mapping = yaml.safe_load(path.read_text())
    mapping["training"].update(
        per_device_train_batch_size=2, gradient_accumulation_steps=2 // processes, max_grad_norm=1.0, **training
    )
    if teacher == "online":
        mapping["stages"][0].update(teacher="online", topk=None)
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


def launch(config: Path, *kill, expect_kill: bool = False, processes: int = 2, extensions: str | None = None, **env):
    """``tests.distributed.child CONFIG [KILL_STAGE KILL_STEP]`` under torchrun: DDP runs with
    ACCELERATE_USE_CPU, DeepSpeed runs with DS_ACCELERATOR=cpu (its CPU extensions in ``extensions``)."""
    training = yaml.safe_load(config.read_text())["training"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **env)
    if extensions is not None:
        env["TORCH_EXTENSIONS_DIR"] = extensions
    if "deepspeed" not in training and "fsdp" not in training:
        env["ACCELERATE_USE_CPU"] = "true"
    done = torchrun("-m", "tests.distributed.child", config, *kill, env=env, processes=processes)
    if expect_kill:
        assert done.returncode != 0, done.stdout[-2000:]
    else:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        assert all(f"rank {r} finished" in done.stdout for r in range(processes))
    return done


def history(out: Path, stage: str) -> list[dict]:
    return [e for e in json.loads((out / stage / "stage.json").read_text())["log_history"] if "loss" in e]


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "sft" / "final" / "model.safetensors"))


def same_run(a: Path, b: Path, *, tol: float = 2e-4) -> None:
    """Runs ``a`` and ``b`` (output folders): the same steps, loss, ce_loss (and kd_loss) per step and the
    same final weights, within ``tol``."""
    for stage in ("kd", "sft"):
        ha, hb = history(a, stage), history(b, stage)
        assert [e["step"] for e in ha] == [e["step"] for e in hb] == list(range(1, STEPS + 1))
        for ea, eb in zip(ha, hb):
            for key in ("loss", "ce_loss") + (("kd_loss",) if stage == "kd" else ()):
                assert ea[key] == pytest.approx(eb[key], rel=tol, abs=tol), (stage, ea["step"], key, ea[key], eb[key])
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=tol, msg=name)


def plain(path: Path, out: Path, *, accumulation: int | None = None) -> Path:
    """The config at ``path`` in one plain process (no engine), writing to ``out``; ``accumulation``:
    its gradient accumulation steps (default: the config's)."""
    mapping = yaml.safe_load(path.read_text())
    mapping["output_dir"] = str(out)
    for key in ("deepspeed", "ddp_backend", "fsdp", "fsdp_config"):
        mapping["training"].pop(key, None)
    mapping["training"]["use_cpu"] = True
    if accumulation is not None:
        mapping["training"]["gradient_accumulation_steps"] = accumulation
    single = path.parent / "plain.yaml"
    single.write_text(yaml.safe_dump(mapping))
    return single
