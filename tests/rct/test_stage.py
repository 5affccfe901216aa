"""The rct stage end to end on a tiny model through ``clinkd train``: each round finds wrong answers,
writes its corrections, and trains on them; a run killed (SIGKILL) in a round's generation — between
batches or mid-write — or in its training resumes to the same corrections and the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from clinkd.cli import main
from clinkd.data.records import load_records
from clinkd.rct.round import CORRECTIONS, JOURNAL, apply_corrections
from clinkd.train import load_config, run_training
from tests.rct.helpers import ROUNDS, rct_config
from tests.train import setup

REPO = Path(__file__).resolve().parents[2]


class Capture(TrainerCallback):
    """The records each round's Trainer trains on."""

    def __init__(self):
        self.records = {}

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.records[os.path.basename(args.output_dir)] = list(train_dataloader.dataset.records)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    data_file = setup.tiny.make_data(folder / "data", 7, seed=4)
    capture = Capture()
    results = run_training(load_config(rct_config(folder, data_file)), progress=False, callbacks=[capture])
    return folder, data_file, results, capture


def _files(out: Path) -> dict:
    return {r: (out / "rct" / f"round-{r}" / CORRECTIONS).read_bytes() for r in range(1, ROUNDS + 1)}


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "rct" / f"round-{ROUNDS}" / "final" / "model.safetensors"))


def test_each_round_corrects_then_trains_on_its_corrections(straight):
    folder, data_file, results, capture = straight
    out = folder / "out"
    records = load_records(data_file)
    stage = json.loads((out / "rct" / "stage.json").read_text())
    assert stage["final"] == str(out / "rct" / f"round-{ROUNDS}" / "final") == results["rct"]["final"]
    for r in range(1, ROUNDS + 1):
        lines = [json.loads(x) for x in (out / "rct" / f"round-{r}" / CORRECTIONS).read_text().splitlines()]
        assert [(x["id"], x["round"]) for x in lines] == [(rec.id, r) for rec in records]
        wrong = [x for x in lines if x["wrong"]]
        assert wrong and all(len(x["candidates"]) == 2 for x in wrong)  # a random model answers wrong
        trained = capture.records[f"round-{r}"]
        assert trained == apply_corrections(records, lines, mode="join")
        assert len(trained) == len(records) + len(wrong)
        info = stage["rounds"][r - 1]
        assert info["training_records"] == len(trained) and info["summary"]["all"]["wrong"] == len(wrong)
        assert info["stats"]["answer_tokens"] > 0 and info["stats"]["candidate_tokens"] > 0
        assert (out / "rct" / f"round-{r}" / "final" / "clinkd_patch.json").is_file()
    steps = [e["step"] for e in stage["log_history"] if "loss" in e]
    assert steps == [1, 2, 3, 4]  # the rounds' steps continue one another
    assert capture.records["sft"] is not None and "round-1" in capture.records


def _child(config: Path, *args) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.run(
        [sys.executable, "-m", "tests.rct.kill_child", str(config), *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr[-3000:]


@pytest.mark.parametrize(
    "kill",
    [("journal", 2, 2), ("journal", 1, 2, "torn"), ("step", 1, 2)],
    ids=["between-batches", "mid-write", "mid-training"],
)
def test_a_killed_round_resumes_to_the_same_corrections_and_weights(straight, tmp_path, kill):
    folder, data_file, _, _ = straight
    config = rct_config(tmp_path, data_file)
    _child(config, *kill)
    round_dir = tmp_path / "out" / "rct" / f"round-{kill[1]}"
    if kill[0] == "journal":
        assert (round_dir / JOURNAL).is_file() and not (round_dir / CORRECTIONS).exists()
    else:
        assert (round_dir / CORRECTIONS).is_file() and list(round_dir.glob("checkpoint-*"))
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    assert _files(tmp_path / "out") == _files(folder / "out")
    want, got = _weights(folder / "out"), _weights(tmp_path / "out")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_rct_report_summarises_every_round(straight, tmp_path, capsys):
    folder, _, results, _ = straight
    out = folder / "out"
    assert main(["rct-report", str(out), "--json", str(tmp_path / "rct.json")]) == 0
    text = capsys.readouterr().out
    reports = json.loads((tmp_path / "rct.json").read_text())
    assert [r["round"] for r in reports] == [f"round-{r}" for r in range(1, ROUNDS + 1)]
    for report, info in zip(reports, results["rct"]["rounds"]):
        assert report["summary"] == info["summary"] and report["complete"]
        assert f"## rct / {report['round']}" in text
        everything = info["summary"]["all"]
        assert f"| all | {everything['checked']} | {everything['wrong']} | {everything['by_candidate']} | " in text
        assert 0 < report["cost"]["correction_share"] < 1
    assert main(["rct-report", str(out / "rct")]) == 0  # the stage folder itself
    capsys.readouterr()
    assert main(["rct-report", str(out / "sft")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no RCT round" in err
