"""The demo pipeline: derived configs, the report files, and (slow) the whole run on a small data set."""

import json

import pytest

from clinkd.demo.pipeline import demo_preset, derive_configs, run_demo
from clinkd.demo.report import write_report
from clinkd.train.config import ConfigError, parse_config
from clinkd.train.presets import get_preset


def test_derived_configs(tmp_path):
    mapping = dict(demo_preset(), output_dir=str(tmp_path / "out"))
    configs = derive_configs(mapping)
    teacher, student, control = (parse_config(configs[k]) for k in ("teacher", "student", "control"))
    assert teacher.student.patch is None and [s.type for s in teacher.stages] == ["sft"]
    assert teacher.student.config == mapping["models"]["teacher"]["config"]
    assert [s.type for s in student.stages] == ["kd", "sft"]
    assert student.stages[0].curriculum is not None and student.student.patch["mcg_rope"]
    assert student.teacher.from_pretrained == str(tmp_path / "out" / "teacher" / "sft" / "final")
    assert control.teacher is None and control.student.patch == student.student.patch
    epochs = [student.stage_args(s)["num_train_epochs"] for s in student.stages]
    assert control.stage_args(control.stages[0])["num_train_epochs"] == sum(epochs)
    assert get_preset("demo") == demo_preset()


def test_bad_demo_config_fails_before_running(tmp_path):
    with pytest.raises(ConfigError, match="training"):
        run_demo(overrides=[f"output_dir={tmp_path}", "training.no_such_argument=1"], progress=False)
    with pytest.raises(ConfigError, match="models.teacher.config"):
        derive_configs(dict(demo_preset(), output_dir=str(tmp_path),
                            models={"student": demo_preset()["models"]["student"]}))
    assert not (tmp_path / "teacher").exists()


def test_report_files(tmp_path):
    block = {"per_modality": {"ct": {"Recall@0.5": 50.0, "n": 2}}, "macro": {"Recall@0.5": 50.0}}
    scores = {"tasks": {"VG": block}, "n": 2, "missing": 0, "meteor": "not requested", "spice": "unavailable"}
    report = {"scores": {"teacher": scores, "student": scores}, "timings_s": {"total": 1.0},
              "load_average": {"start": [1, 1, 1], "end": [2, 2, 2]}, "cpu_count": 2, "torch_threads": 2,
              "loss_curves": {"teacher/sft": [(1, 2.0), (2, 1.0)], "student/kd": [(1, 3.0)]}}
    write_report(tmp_path, report)
    text = (tmp_path / "report.md").read_text()
    assert "| teacher (SFT) | 50.00 | n/a |" in text
    assert json.loads((tmp_path / "report.json").read_text())["scores"]["student"]["tasks"]["VG"]["macro"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path):
    from clinkd.demo.data import build_demo_data

    build_demo_data(tmp_path / "data", train_per_modality=2, test_per_modality=1)
    overrides = [f"output_dir={tmp_path / 'out'}", f"data.train={tmp_path / 'data' / 'train.jsonl'}",
                 "training.per_device_train_batch_size=8",
                 "stages=[{name: kd, type: kd, teacher: store, topk: 8, curriculum: {start_fraction: 0.5, "
                 "warmup_steps: 2}, training: {num_train_epochs: 1}}, {name: sft, type: sft, "
                 "training: {num_train_epochs: 1}}]"]
    report = run_demo(overrides=overrides, progress=False, max_new_tokens=8)
    for name in ("teacher", "student", "control"):
        assert set(report["scores"][name]["tasks"]) == {"VG", "ROC", "RC", "MIA"}
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "report.json").is_file()
    assert (tmp_path / "out" / "student" / "pseudo_labels").is_dir()
    with pytest.raises(ConfigError, match="already holds stage folders"):  # --no-resume refuses a used folder
        run_demo(overrides=overrides, progress=False, resume=False)
