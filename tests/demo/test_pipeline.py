"""The demo pipeline: derived configs, the report files, and (slow) the whole run on a small data set."""

import json

import pytest

from clinkd.demo.pipeline import demo_preset, derive_configs, run_demo
from clinkd.demo.report import loss_curves, write_report
from clinkd.train.config import ConfigError, parse_config


def test_derived_configs(tmp_path):
    mapping = dict(demo_preset(), output_dir=str(tmp_path / "out"))
    configs = derive_configs(mapping)
    assert list(configs) == ["teacher", "student", "student_sft", "control"]
    teacher, student, ablation, control = (parse_config(configs[k]) for k in configs)
    assert teacher.student.patch is None and [s.type for s in teacher.stages] == ["sft"]
    assert teacher.student.config == mapping["models"]["teacher"]["config"]
    assert [s.type for s in student.stages] == ["kd", "sft", "rct"]
    assert student.stages[0].curriculum is not None and student.student.patch["mcg_rope"]
    assert student.teacher.from_pretrained == str(tmp_path / "out" / "teacher" / "sft" / "final")
    assert control.teacher is None and control.student.patch == student.student.patch
    epochs = [student.stage_args(s)["num_train_epochs"] for s in student.stages[:2]]
    assert control.stage_args(control.stages[0])["num_train_epochs"] == sum(epochs)  # matched to KD → SFT
    # RCT's ablation: from the student after SFT, as many one-epoch segments of SFT as RCT has rounds
    rct = student.stages[2].rct
    assert ablation.student.from_pretrained == str(tmp_path / "out" / "student" / "sft" / "final")
    assert ablation.student.patch == student.student.patch and ablation.teacher is None
    assert [s.type for s in ablation.stages] == ["sft"] * rct.rounds
    assert all(ablation.stage_args(s)["num_train_epochs"] == 1 for s in ablation.stages)
    without = derive_configs(dict(mapping, stages=mapping["stages"][:2]))
    assert list(without) == ["teacher", "student", "control"]


def test_bad_demo_config_fails_before_running(tmp_path):
    with pytest.raises(ConfigError, match="training"):
        run_demo(overrides=[f"output_dir={tmp_path}", "training.no_such_argument=1"], progress=False)
    with pytest.raises(ConfigError, match="models.teacher.config"):
        derive_configs(
            dict(demo_preset(), output_dir=str(tmp_path), models={"student": demo_preset()["models"]["student"]})
        )
    assert not (tmp_path / "teacher").exists()


def test_report_files(tmp_path):
    block = {"per_modality": {"ct": {"Recall@0.5": 50.0, "n": 2}}, "macro": {"Recall@0.5": 50.0}}
    scores = {"tasks": {"VG": block}, "n": 2, "missing": 0, "meteor": "not requested", "spice": "unavailable"}
    entry = {"value": 50.0, "interval": [0.0, 100.0]}
    intervals = {
        "method": "paired stratified percentile bootstrap over test questions",
        "resamples": 10,
        "confidence": 0.95,
        "seed": 0,
        "models": {"teacher": {"VG": {"Recall@0.5": entry}}, "student": {"VG": {"Recall@0.5": entry}}},
        "differences": {
            "teacher - student": {"VG": {"Recall@0.5": {"value": 0.0, "interval": [-50.0, 50.0], "clear": False}}}
        },
    }
    history = {
        "kd": {
            "log_history": [{"loss": 3.0, "kd_loss": 2.0, "ce_loss": 3.5, "step": 2}, {"train_runtime": 1.0, "step": 4}]
        },
        "sft": {"log_history": [{"loss": 1.0, "ce_loss": 1.0, "step": 2}, {"train_runtime": 1.0, "step": 4}]},
    }
    curves = loss_curves({"student": history, "teacher": {"sft": history["sft"]}})
    # The SFT stage continues the KD stage's step count; each part of the KD stage is its own series.
    assert curves["series"]["student/ce"] == [[2, 3.5], [6, 1.0]]
    assert curves["series"]["student/kd"] == [[2, 2.0]] and curves["series"]["student/objective"] == [[2, 3.0]]
    assert curves["series"]["teacher/ce"] == [[2, 1.0]] and "teacher/kd" not in curves["series"]
    assert curves["boundaries"] == {"student": [[4, "kd → sft"]]}
    report = {
        "scores": {"teacher": scores, "student": scores},
        "intervals": intervals,
        "timings_s": {"data": 3.0, "total": 1.0},
        "skipped": ["data"],
        "commit": "abc1234",
        "load_average": {"start": [1, 1, 1], "end": [2, 2, 2]},
        "cpu_count": 2,
        "torch_threads": 2,
        "loss_curves": curves,
    }
    write_report(tmp_path, report)
    text = (tmp_path / "report.md").read_text()
    assert "| teacher (SFT) | 50.00 [0.00, 100.00] | n/a |" in text
    assert "| teacher − student | 0.00 [-50.00, 50.00] | n/a |" in text
    assert "- teacher vs student: no difference larger than its interval" in text
    assert "- data: 3.0 (skipped on resume" in text and "commit: abc1234" in text
    assert json.loads((tmp_path / "report.json").read_text())["scores"]["student"]["tasks"]["VG"]["macro"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path, capsys, monkeypatch):
    """The demo as typed (``clinkd demo``) on a small data set: the score table with
    intervals on the console; a resumed run keeps the first run's step times; the student's final
    model predicts with ``clinkd predict`` alone (its patch recorded) exactly as the demo did."""
    import clinkd.demo.pipeline as pipeline
    from clinkd.cli import main
    from clinkd.demo.data import build_demo_data

    build_demo_data(tmp_path / "data", train_per_modality=2, test_per_modality=1)
    overrides = [
        f"output_dir={tmp_path / 'out'}",
        f"data.train={tmp_path / 'data' / 'train.jsonl'}",
        "training.per_device_train_batch_size=8",
        "stages=[{name: kd, type: kd, teacher: store, topk: 8, curriculum: {start_fraction: 0.5, "
        "warmup_steps: 2}, training: {num_train_epochs: 1}}, {name: sft, type: sft, "
        "training: {num_train_epochs: 1}}, {name: rct, type: rct, rounds: 1, batch_size: 8, "
        "max_new_tokens: 8, candidates: 2}]",
    ]
    monkeypatch.setattr(pipeline, "BOOTSTRAP_RESAMPLES", 30)
    assert main(["demo", "--no-progress"] + [a for o in overrides for a in ("--set", o)]) == 0
    printed = capsys.readouterr().out
    assert "| teacher (SFT) |" in printed and "| student − control |" in printed
    assert "| student+RCT − student+SFT |" in printed
    assert "Differences larger than their intervals:" in printed and "predictions in" in printed
    out = tmp_path / "out"
    first = json.loads((out / "report.json").read_text())
    for name in ("teacher", "student", "student_rct", "student_sft", "control"):
        assert set(first["scores"][name]["tasks"]) == {"VG", "ROC", "RC", "MIA"}
        assert (
            first["intervals"]["models"][name]["MIA"]["mBMR"]["interval"] is not None
            or first["scores"][name]["meteor"] != "available"
        )
    assert first["skipped"] == ["data"]  # the data set was given
    assert (out / "student" / "pseudo_labels").is_dir()
    assert [r["round"] for r in first["rct"]] == ["round-1"] and first["rct"][0]["summary"]["all"][
        "checked"
    ] == 40  # 5 modalities × 2 images × 4 tasks
    report_md = (out / "report.md").read_text()
    assert "## RCT rounds of the student" in report_md and "### rct / round-1" in report_md
    every = first["rct"][0]["summary"]["all"]
    passed = f"round-1: {every['by_candidate']} of {every['wrong']}"
    assert (
        f"per round: {passed}" in printed
        and f"passing candidate (the others kept the ground truth): {passed}." in report_md
    )

    again = run_demo(overrides=overrides, progress=False, max_new_tokens=8, resamples=10)
    assert again["skipped"] == ["data", "train_teacher", "train_student", "train_student_sft", "train_control"]
    assert again["rct"] == first["rct"]
    for step in again["skipped"][1:]:
        assert again["timings_s"][step] == first["timings_s"][step]

    preds = tmp_path / "student.jsonl"
    assert (
        main(
            [
                "predict",
                "--model",
                str(out / "student" / "sft" / "final"),
                "--data",
                str(tmp_path / "data" / "test.jsonl"),
                "--out",
                str(preds),
                "--max-new-tokens",
                "8",
                "--batch-size",
                "20",
                "--no-progress",
            ]
        )
        == 0
    )
    assert preds.read_text() == (out / "predictions" / "student.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds stage folders"):  # --no-resume refuses a used folder
        run_demo(overrides=overrides, progress=False, resume=False)
