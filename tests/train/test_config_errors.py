"""Bad config or data: one clear error, exit code 2, before any training (no Trainer.train, no stage folder)."""

from __future__ import annotations

import json

import pytest
import yaml

from clinkd.cli import main
from clinkd.train import ClinKDTrainer, ConfigError, get_preset, load_config, preset_names
from tests.data import tiny
from tests.train import setup


@pytest.fixture
def no_training(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("training started despite a bad config")

    monkeypatch.setattr(ClinKDTrainer, "train", refuse)


@pytest.fixture
def run(tmp_path):
    data_file = tiny.make_data(tmp_path / "data", 6, seed=2)
    return tmp_path, setup.run_config(tmp_path, data_file), data_file


def _fails(capsys, config, message, *extra):
    code = main(["train", "--config", str(config), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert not (config.parent / "out" / "kd").exists() and not (config.parent / "out" / "sft").exists()
    return err


def _edit_records(data_file, fn):
    records = json.loads(data_file.read_text())
    fn(records)
    data_file.write_text(json.dumps(records))


def test_missing_image(run, capsys, no_training):
    folder, config, data_file = run
    victim = json.loads(data_file.read_text())[3]["id"]
    (data_file.parent / f"{victim}.png").unlink()
    _fails(capsys, config, f"{victim}.png does not exist")


def test_unknown_task(run, capsys, no_training):
    folder, config, data_file = run
    _edit_records(data_file, lambda r: r[1].update(task="SEGMENTATION"))
    _fails(capsys, config, "unknown task 'SEGMENTATION'; expected one of VG, ROC, RC, MIA")


def test_box_outside_the_unit_square(run, capsys, no_training):
    folder, config, data_file = run

    def edit(records):
        records[2]["conversations"] = [["<img>x</img> Where is it?", "<box>(0.2,0.3),(1.25,0.9)</box>"]]

    _edit_records(data_file, edit)
    err = _fails(capsys, config, "corners outside [0, 1] (1.25)")
    assert "train.json[2]" in err  # the error points at the record


def test_record_without_supervised_tokens(run, capsys, no_training):
    folder, config, data_file = run

    def edit(records):
        long_question = " ".join(["the liver and the left kidney"] * 80)
        records[4]["conversations"] = [["<img>x</img> " + long_question, "lesion"]]

    _edit_records(data_file, edit)
    _fails(
        capsys,
        config,
        "no supervised (answer) token left after truncation to max_length=256",
        "--set",
        "data.max_length=256",
    )


def test_teacher_vocabulary_smaller_than_the_students(run, capsys, no_training):
    folder, config, _ = run
    vocab = len(tiny.processor().tokenizer)
    _fails(
        capsys,
        config,
        f"vocabulary {vocab} is smaller than the student's {vocab + 20}",
        "--set",
        f"models.student.config.text_config.vocab_size={vocab + 20}",
        "--set",
        f"models.teacher.config.text_config.vocab_size={vocab}",
    )


def test_patch_the_model_cannot_take(run, capsys, no_training):
    folder, config, _ = run
    _fails(
        capsys,
        config,
        "supports head_dim in (64, 72, 80, 96, 128), this model has 16",
        "--set",
        "models.student.patch.attention=true",
    )


def test_unknown_preset(tmp_path, capsys, no_training):
    code = main(["train", "--preset", "no-such-preset", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown preset 'no-such-preset'; known presets: " + ", ".join(preset_names()) in err
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"preset": "nope", "output_dir": "x"}))
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config(config)


def test_store_written_for_other_settings(run, capsys, no_training):
    """A store left by a run with another k is refused before the student trains."""
    folder, config, _ = run
    from clinkd.distill import PseudoLabelWriter, StoreMeta
    from tests.distill import fake

    writer = PseudoLabelWriter(
        folder / "out" / "pseudo_labels",
        StoreMeta(teacher="someone-else", k=fake.K, temperature=0.8, vocab_size=fake.VOCAB, tokenizer_hash="x"),
        ["a", "b"],
    )
    writer.add("a", *fake.sample_rows(0))
    writer.close()
    err = _fails(capsys, config, "was written for another run")
    assert "k: store has 4, this run has 6" in err


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"stages": [{"name": "kd", "type": "kd", "temperature": 0}]}, "config.stages[0].temperature must be >= 1e-06"),
        ({"stages": [{"name": "kd", "type": "kd", "curriculum": {"start_fraction": 0}}]}, "start_fraction must be in"),
        ({"stages": [{"name": "x", "type": "distill"}]}, "config.stages[0].type must be one of kd, sft, rct"),
        ({"stages": [{"name": "a", "type": "sft"}, {"name": "a", "type": "sft"}]}, "stage names must be unique"),
        ({"stages": [{"name": "s", "type": "sft", "training": {"learning_rat": 1}}]}, "unknown key(s) learning_rat"),
        ({"stages": [{"name": "s", "type": "sft", "training": {"output_dir": "x"}}]}, "are set by clinkd"),
        ({"data": {"max_length": 512}}, "config.data.train (the training data file) is required"),
        ({"models": {"student": {"dtype": "float32"}}}, "needs exactly one of from_pretrained"),
        ({"modles": {}}, "unknown key(s) modles"),
    ],
)
def test_config_errors_name_the_key(run, edit, message):
    folder, config, _ = run
    mapping = yaml.safe_load(config.read_text())
    mapping.update(edit)
    config.write_text(yaml.safe_dump(mapping))
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert message in str(info.value)


def test_presets_are_complete_configs(tmp_path):
    from clinkd.train import parse_config

    assert {
        "tiny",
        "tiny-qwen3-vl",
        "clinkd-qwen2-vl-7b",
        "clinkd-qwen2-vl-7b-rct",
        "clinkd-qwen2.5-vl-7b",
        "clinkd-qwen3-vl-8b",
    } <= set(preset_names())
    for name in preset_names():
        mapping = dict(get_preset(name), output_dir=str(tmp_path), data={"train": str(tmp_path / "t.json")})
        if name.startswith("clinkd-"):
            mapping["models"] = dict(mapping["models"], teacher={"from_pretrained": "a/teacher"})
        parse_config(mapping)
    assert [
        s.type
        for s in parse_config(
            dict(
                get_preset("clinkd-qwen2-vl-7b-rct"),
                output_dir=str(tmp_path),
                data={"train": "t.json"},
                models={"student": {"from_pretrained": "s"}, "teacher": {"from_pretrained": "t"}},
            )
        ).stages
    ] == ["kd", "sft", "rct"]
    assert get_preset("clinkd-qwen3-vl-8b")["models"]["student"]["from_pretrained"] == "Qwen/Qwen3-VL-8B-Instruct"
    assert main(["presets"]) == 0


def test_transformers_outside_the_supported_window(run, capsys, no_training, monkeypatch):
    """A transformers the patch does not support: one line naming the window and the pip command, exit 2,
    before anything is built (not a traceback from the first patched model)."""
    import sys

    folder, config, _ = run
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.99.0")
    err = _fails(capsys, config, "supports transformers >=5.0,<5.26, but transformers 5.99.0 is installed")
    assert "pip install 'transformers>=5.0,<5.26'" in err and len(err.strip().splitlines()) == 1
