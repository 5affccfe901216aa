"""``clinkd train`` and ``clinkd predict`` as typed, with a Qwen3-VL (the ``tiny-qwen3-vl`` preset) and a
Qwen2.5-VL student and teacher: the KD and SFT stages run, the saved model is of the family and
patched with the recorded MCG-RoPE settings when ``predict`` loads it, and predictions come out."""

from __future__ import annotations

import json

import pytest
import yaml

from clinkd.cli import main
from tests.data import tiny
from tests.train.setup import QWEN2_5_VL


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_train_then_predict(family, tmp_path, capsys):
    data = tiny.make_data(tmp_path / "data", 6, seed=4)
    config = {
        "preset": "tiny-qwen3-vl",
        "output_dir": str(tmp_path / "out"),
        "data": {"train": str(data)},
        "training": {"max_steps": 2, "save_steps": 50},
    }
    if family == "qwen2_5_vl":
        config["models"] = {
            "student": {"config": QWEN2_5_VL},
            "teacher": {"config": dict(QWEN2_5_VL, text_config=dict(QWEN2_5_VL["text_config"], num_hidden_layers=3))},
        }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    final = tmp_path / "out" / "sft" / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == family
    assert json.loads((final / "clinkd_patch.json").read_text())["patch"]["mcg_rope"] == {
        "modality_gap": 2,
        "vision_stride": 1,
    }

    out = tmp_path / "preds.jsonl"
    assert (
        main(
            [
                "predict",
                "--model",
                str(final),
                "--data",
                str(data),
                "--processor",
                str(tmp_path / "out" / "processor"),
                "--out",
                str(out),
                "--max-new-tokens",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(isinstance(r["response"], str) for r in rows)
    assert "6 predictions" in capsys.readouterr().out
