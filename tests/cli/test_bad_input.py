"""Bad input at the command line: configs, ``--set`` values, paths and arguments a hostile user could give.

Every outcome of ``clinkd.cli.main`` must be one of two things: exit code 0 (the command did its work),
or exit code 2 with exactly one line on stderr (``clinkd COMMAND: error: ...``) that names the key, the
file (``file:line``) or the argument. Never a traceback, another exit code, a hang, or a ``clinkd
check`` that passes a config ``clinkd train`` then fails on. Training itself never starts here: the
checks that ``clinkd train`` makes before its first step are what is tested.

The first part holds one regression test per defect found so far; the second the property-based hunt
(hypothesis, derandomized and bounded; models, data and configs are built once per module).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinkd.cli import main
from clinkd.train import ClinKDTrainer
from tests.data import tiny
from tests.train import setup

FAST = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0  # permissions do not stop root


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("training started: the checks before it passed")

    monkeypatch.setattr(ClinKDTrainer, "train", refuse)


@pytest.fixture(autouse=True)
def sandbox(monkeypatch, tmp_path_factory):
    """HOME and the working folder in a fresh temporary folder (two levels deep): the relative paths and
    the ~ of the hunt ("." "..", "~") write there, never into the checkout or the real home. (The hunt's
    paths are all in there too: never "/", where root could write.) And no hub downloads."""
    home = tmp_path_factory.mktemp("sandbox")
    cwd = home / "cwd" / "deeper"
    cwd.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    # no hub downloads: a path that does not exist is tried as a hub id
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return home


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny run: data (6 records), run.yaml (KD then SFT, output_dir "out" beside it), a file, a folder,
    a non-UTF-8 config; one `clinkd check` run first so the processor is saved in out/processor."""
    folder = tmp_path_factory.mktemp("cli")
    data = tiny.make_data(folder / "data", 6, seed=2)
    config = setup.run_config(folder, data)
    (folder / "a_file").write_text("x")
    (folder / "a_folder").mkdir()
    (folder / "latin1.yaml").write_bytes(config.read_bytes() + "# caf\u00e9\n".encode("latin-1"))
    return {
        "folder": folder,
        "data": data,
        "config": config,
        "file": folder / "a_file",
        "dir": folder / "a_folder",
        "latin1": folder / "latin1.yaml",
    }


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``clinkd ARGV`` run in this process (argparse errors included)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def user_error(result, *fragments: str) -> str:
    """Exit 2, one line on stderr, naming every fragment; returns the line."""
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err)
    assert re.match(r"clinkd( [a-z]+)*: error: ", lines[0]), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def ok_or_user_error(result) -> None:
    code, out, err = result
    if code == 0:
        return
    user_error(result)


def check(capsys, project, *sets: str, command: str = "check"):
    argv = [command, "--config", project["config"]] + [x for s in sets for x in ("--set", s)]
    if command == "train":
        argv.append("--no-progress")
    if command == "distill":
        argv[1:1] = ["cache"]
    return cli(capsys, *argv)


CONFIG_COMMANDS = ["check", "train", "distill"]


# --------------------------------------------------------------------------------------------------
# regressions: one test per defect


def test_the_tiny_run_passes_check(capsys, project):
    code, out, err = check(capsys, project)
    assert code == 0 and out.startswith("ok: 6 samples"), err


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
@pytest.mark.parametrize(
    "override, message",
    [
        # before: passed check, then a TypeError in the optimizer at the first step
        ("training.learning_rate=abc", "config.training.learning_rate must be a number, got 'abc'"),
        ("stages.0.training.learning_rate=abc", "config.stages[0].training.learning_rate must be a number"),
        # before: passed check; torch's "Invalid learning rate" at the first step
        ("training.learning_rate=-1", "config.training.learning_rate must be >= 0, got -1"),
        ("training.adam_beta1=1.5", "config.training.adam_beta1 must be < 1"),
        ("training.per_device_train_batch_size=0", "config.training.per_device_train_batch_size must be >= 1"),
        ("training.seed=-3", "config.training.seed must be >= 0"),
        # before: passed check; the Trainer's scheduler raised at the first step
        ("training.lr_scheduler_type=linear", None),
        # before: passed check, then the model's constructor refused it (the teacher is not patched)
        (
            "models.teacher.config.text_config.num_attention_heads=5",
            "config.models.teacher.config.text_config: hidden_size 48 must be divisible by num_attention_heads 5",
        ),
        # before: passed check and built, then failed in the first forward pass
        ("models.teacher.config.text_config.num_key_value_heads=2", "must be a multiple of num_key_value_heads 2"),
        ("models.teacher.config.vision_config.num_heads=3", "config.models.teacher.config.vision_config: embed_dim 32"),
        ("models.teacher.config.vision_config.hidden_size=64", "must equal text_config.hidden_size 48"),
        (
            "models.teacher.config.text_config.rope_parameters.mrope_section=[2,2,2]",
            "mrope_section must be integers >= 0 summing to head_dim / 2 = 8",
        ),
        # before: a traceback (StrictDataclassFieldValidationError is not a ValueError)
        ("models.teacher.config.text_config.num_hidden_layers='2'", "config.models.teacher.config is not a valid"),
        # before: a ValueError traceback from the tokenizer builder
        ("processor.offline.vocab_size=-1", "config.processor.offline.vocab_size must be >= 1, got -1"),
        ("processor.offline.min_pixels=4096", "min_pixels 4096 is larger than max_pixels 1024"),
    ],
)
def test_check_refuses_what_train_would_fail_on(capsys, project, command, override, message):
    sets = [override] if message is not None else [override, "training.lr_scheduler_kwargs={bogus: 1}"]
    message = message or "the schedule linear refuses its settings"
    user_error(check(capsys, project, *sets, "output_dir=out-regressions", command=command), message)


def test_offline_processor_reused_only_with_its_options(capsys, project):
    """A saved offline processor was reused whatever the options said (a silent wrong tokenizer)."""
    assert check(capsys, project, "output_dir=out-options")[0] == 0
    user_error(
        check(capsys, project, "output_dir=out-options", "processor.offline.vocab_size=390"),
        "config.processor.offline",
        "differs from the options",
    )


def test_yaml_exponents_are_numbers(capsys, project):
    """``--set training.learning_rate=1e-5`` (the --help example) was the string '1e-5' to PyYAML: a crash
    at the first step. Read the YAML 1.2 way, it is a number."""
    from clinkd.train import load_config

    config = load_config(project["config"], overrides=["training.learning_rate=1e-5"])
    assert config.training["learning_rate"] == 1e-5
    assert check(capsys, project, "training.learning_rate=1e-5")[0] == 0
    user_error(check(capsys, project, "training.learning_rate='1e-5'"), "write the number unquoted")


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_output_dir_that_cannot_be_a_folder(capsys, project, command):
    """Before: an OSError traceback (exit 1) when the processor folder was made."""
    for target, message in ((project["file"], "is not a folder"), (project["file"] / "sub", "is a file, not a folder")):
        user_error(check(capsys, project, f"output_dir={target}", command=command), "config.output_dir", message)
    user_error(
        check(capsys, project, f"stages.0.store={project['file']}/store", command=command), "config.stages[0].store"
    )
    user_error(check(capsys, project, 'output_dir="a\\0b"', command=command), "config.output_dir", "NUL")


@pytest.mark.skipif(ROOT_USER, reason="root writes into read-only folders")
def test_output_dir_that_is_not_writable(capsys, project, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        user_error(check(capsys, project, f"output_dir={locked}/out"), "config.output_dir", "not writable")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
@pytest.mark.parametrize("kind", ["dangling-link", "no-permission"])
def test_store_folder_that_cannot_hold_a_store(capsys, project, tmp_path, monkeypatch, command, kind):
    """Before: a dangling link as the store was a FileExistsError and a folder without permission a
    PermissionError (or, as root, no error at all), and ``clinkd check`` passed both. Now one line naming
    the store and the problem (the config's check refuses both first). As root,
    the owner's answer (from the mode bits) stands in for os.access (tests/distill/test_store.py)."""
    from tests.distill.test_store import as_owner

    store = tmp_path / "store"
    if kind == "dangling-link":
        store.symlink_to(tmp_path / "nowhere")
        words = "is a symbolic link to"
    else:
        store.mkdir()
        store.chmod(0o500)
        if ROOT_USER:
            as_owner(monkeypatch)
        words = "is not writable|no permission to read and write the folder"  # the config check, or the store's
    try:
        line = user_error(check(capsys, project, f"stages.0.store={store}", command=command), str(store))
        assert re.search(words, line), line
    finally:
        if kind == "no-permission":
            store.chmod(0o700)


def test_stage_folder_that_is_a_file(capsys, project):
    out = project["folder"] / "out-stagefile"
    out.mkdir(exist_ok=True)
    (out / "sft").write_text("x")
    user_error(check(capsys, project, f"output_dir={out}"), "config.stages[1].name", "is a file")
    user_error(check(capsys, project, "stages.1.name=processor"), "config.stages[1].name", "cannot be a stage folder")


@pytest.mark.parametrize("command", CONFIG_COMMANDS + ["demo"])
def test_config_file_that_is_not_utf8(capsys, project, command):
    """Before: a UnicodeDecodeError traceback. Now one line naming file:line."""
    argv = [command, "--config", project["latin1"]]
    if command == "distill":
        argv[1:1] = ["cache"]
    lines = project["config"].read_text().count("\n")
    user_error(cli(capsys, *argv), f"{project['latin1']}:{lines + 1}: not UTF-8 text")


@pytest.mark.parametrize("command", CONFIG_COMMANDS + ["demo"])
@pytest.mark.parametrize(
    "override, message",
    [
        ("a=[1,", "override 'a': not valid YAML"),
        ("a={b: [}", "override 'a': not valid YAML"),
        ("a=!!python/object:os.system x", "override 'a': not valid YAML"),
        ("x=" + "[" * 5000, "override 'x'"),
        ("stages.7.name=x", "override 'stages.7.name': stages is a list of 2"),
        ("output_dir.x=1", "output_dir is"),
        ("=3", "has an empty key"),
        ("noequals", "must look like key.path=value"),
    ],
)
def test_malformed_overrides(capsys, project, command, override, message):
    """Before: a yaml traceback (exit 1) for malformed YAML; a list or string on the path was silently
    replaced by a mapping."""
    argv = [command, "--config", project["config"], "--set", override]
    if command == "distill":
        argv[1:1] = ["cache"]
    user_error(cli(capsys, *argv), message)


def test_home_in_paths(project, sandbox):
    """``output_dir: ~/runs`` made a folder named "~" in the working folder (the path was tested for being
    absolute after expanding ~, then used without expanding it)."""
    from clinkd.train import load_config

    config = load_config(project["config"], overrides=["output_dir=~/runs", "stages.0.store=~/store"])
    assert config.output_dir == str(sandbox / "runs") and config.stages[0].store == str(sandbox / "store")


def test_overrides_reach_list_items(capsys, project):
    from clinkd.patch import PatchSpec
    from clinkd.train import load_config

    config = load_config(project["config"], overrides=["stages.1.training.max_steps=9", "stages.-1.name=last"])
    assert config.stages[1].training["max_steps"] == 9 and config.stages[1].name == "last"
    config = load_config(
        project["config"], overrides=["models.student.patch=false", "models.student.patch.attention=false"]
    )
    assert config.student.patch == PatchSpec(attention=False)


def test_demo_output_dir_that_is_a_file(capsys, project):
    """The demo builds its runs under output_dir: one line naming it, before anything trains."""
    user_error(
        cli(
            capsys,
            "demo",
            "--set",
            f"output_dir={project['file']}",
            "--set",
            f"data.train={project['data']}",
            "--no-progress",
        ),
        "config.output_dir",
        "is a file, not a folder",
    )


def test_training_data_with_bad_boxes(capsys, project, tmp_path):
    """Inverted corners, an unclosed tag or an unknown modality in TRAINING data: before, check passed."""
    records = json.loads(project["data"].read_text())
    for image in project["data"].parent.glob("*.png"):
        (tmp_path / image.name).write_bytes(image.read_bytes())
    for edit, message in (
        ({"conversations": [["<img>x</img> q", "<box>(0.5,0.1),(0.2,0.3)</box>"]], "task": "VG"}, "inverted corners"),
        ({"conversations": [["<img>x</img> q", "<box>(0.1,0.1),(0.2,0.3)"]], "task": "VG"}, "is not closed"),
        ({"id": "brain_0001", "image": records[0]["id"] + ".png"}, "unknown modality 'brain'"),
    ):
        data = tmp_path / f"bad{len(message)}.json"
        data.write_text(json.dumps([records[0], dict(records[1], **edit)]))
        user_error(check(capsys, project, f"data.train={data}", "output_dir=out-boxes"), f"{data}[1]", message)


@pytest.fixture(scope="module")
def fake_model(project):
    folder = project["folder"] / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}")
    return folder


def _options(base: dict, args: list[str], fill: dict) -> list[str]:
    """The command line of ``base`` options with ``args`` (``[option, value, ...]``, values formatted with
    ``fill``) put over them."""
    given = dict(zip(args[::2], [a.format(**fill) for a in args[1::2]]))
    return [x for k, v in {**base, **given}.items() for x in (k, v)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "{dir}"], "argument --out: {dir} is a folder, not a file"),
        (["--out", "{file}/p.jsonl"], "its folder {file} is not a folder"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--max-new-tokens", "x"], "argument --max-new-tokens: 'x' is not an integer"),
        (["--max-length", "3"], "argument --max-length: must be >= 8"),
        (["--device", "nope"], "argument --device: 'nope' is not a torch device"),
        (["--device", "cuda:99"], "argument --device: 'cuda:99'"),
        (["--model", "{file}"], "argument --model: {file} is not a folder"),
        (["--patch", "{{"], "--patch is not valid JSON"),
        (["--data", "{latin1}"], "{latin1}:"),
    ],
)
def test_predict_arguments(capsys, project, fake_model, args, message):
    """Before: an --out folder failed after every prediction was made (the work lost); a bad --device or
    --batch-size failed after the model loaded, as a RuntimeError traceback for the device."""
    fill = {k: v for k, v in project.items()}
    base = {"--model": str(fake_model), "--data": str(project["data"]), "--out": str(project["folder"] / "p.jsonl")}
    argv = ["predict"] + _options(base, args, fill)
    user_error(cli(capsys, *argv), message.format(**fill))


def test_predict_runs_nothing_heavy_before_its_checks(capsys, project, fake_model, monkeypatch):
    import clinkd.eval.predict as predict

    monkeypatch.setattr(predict, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    user_error(
        cli(
            capsys, "predict", "--model", fake_model, "--data", project["data"], "--out", project["folder"] / "p.jsonl"
        ),
        "clinkd predict: error:",
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--json", "{dir}"], "argument --json: {dir} is a folder"),
        (["--json", "{file}/r.json"], "its folder {file} is not a folder"),
        (["--pred", "{latin1}"], "{latin1}:"),
        (["--pred", "{dir}"], "{dir}"),
    ],
)
def test_eval_arguments(capsys, project, args, message):
    fill = dict(project)
    preds = project["folder"] / "preds.jsonl"
    preds.write_text(json.dumps({"id": "ct_0000_x", "response": "r", "annotation": "a", "task": "MIA"}) + "\n")
    base = {"--pred": str(preds)}
    argv = ["eval", "--no-meteor"] + _options(base, args, fill)
    user_error(cli(capsys, *argv), message.format(**fill))


def test_eval_json_into_a_new_folder(capsys, project):
    preds = project["folder"] / "preds-ok.jsonl"
    preds.write_text(json.dumps({"id": "ct_0000_x", "response": "a b", "annotation": "a b", "task": "ROC"}) + "\n")
    target = project["folder"] / "new" / "deeper" / "r.json"
    code, out, err = cli(capsys, "eval", "--no-meteor", "--pred", preds, "--json", target)
    assert code == 0 and json.loads(target.read_text())["n"] == 1, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "{file}"], "argument --out: {file} is not a folder"),
        (["--out", "{file}/sub"], "is a file, not a folder"),
        (["--seed", "-1"], "argument --seed: must be >= 0"),
        (["--train-per-modality", "0"], "argument --train-per-modality: must be >= 1"),
        (["--test-per-modality", "two"], "'two' is not an integer"),
    ],
)
def test_data_demo_arguments(capsys, project, args, message):
    fill = dict(project)
    base = {"--out": str(project["folder"] / "demo-data")}
    argv = ["data", "demo", "--no-progress"] + _options(base, args, fill)
    user_error(cli(capsys, *argv), message.format(**fill))
    assert not (project["folder"] / "demo-data").exists()


def test_argparse_errors_are_one_line(capsys):
    for argv in (["train", "--bogus"], ["nope"], ["distill"], ["predict"], ["eval", "--pred"]):
        user_error(cli(capsys, *argv), "(see clinkd")


def test_the_boundary(capsys, monkeypatch):
    """OSError, UnicodeError and YAML errors a command raises are one line naming the path; any other
    exception is a bug and keeps its traceback."""
    import yaml as yaml_module

    import clinkd.train.cli as train_cli

    raised = {}

    def command(args):
        raise raised["error"]

    monkeypatch.setattr(train_cli, "presets_command", command)
    for error, fragment in (
        (IsADirectoryError(21, "Is a directory", "/x/y"), "Is a directory: /x/y"),
        (OSError(28, "No space left on device", "/a", None, "/b"), "No space left on device: /a -> /b"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not UTF-8"),
        (yaml_module.YAMLError("bad\nyaml"), "not valid YAML (bad yaml)"),
    ):
        raised["error"] = error
        user_error(cli(capsys, "presets"), fragment)
    for bug in (KeyError("k"), RuntimeError("bug"), AttributeError("a")):
        raised["error"] = bug
        with pytest.raises(type(bug)):
            main(["presets"])


_CHILD = """
import json, sys
from clinkd.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    sys.stderr.write("\\0MARK\\n"); sys.stderr.flush()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    sys.stderr.flush()
    codes.append(code)
print(json.dumps(codes))
"""


def test_one_line_on_the_real_stderr(project):
    """In a real process (one child, several commands), stderr holds exactly the error line: no traceback,
    and none of the warnings transformers logs while a bad model config is built (capsys cannot see those:
    transformers' log handler writes to the process's stderr)."""
    import subprocess
    import sys

    config = str(project["config"])
    cases = [
        ["check", "--config", config, "--set", "models.student.config.text_config.vocab_size=0"],
        ["check", "--config", config, "--set", "models.teacher.config.text_config.num_attention_heads=5"],
        ["check", "--config", config, "--set", "a=[1,"],
        ["train", "--config", config, "--no-progress", "--set", f"output_dir={project['file']}"],
        ["check", "--config", str(project["latin1"])],
        ["predict", "--model", str(project["dir"]), "--data", str(project["data"]), "--out", "p", "--device", "x"],
    ]
    root = Path(__file__).resolve().parents[2]  # this checkout's clinkd, whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=project["folder"],
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [2] * len(cases), done.stderr
    segments = done.stderr.split("\0MARK\n")
    assert not segments[0].strip(), segments[0]
    for argv, err in zip(cases, segments[1:]):
        assert len(err.strip().splitlines()) == 1 and err.startswith(f"clinkd {argv[0]}: error: "), (argv, err)


# --------------------------------------------------------------------------------------------------
# the hunt: random --set values, paths and arguments; the category of every outcome checked

KEYS = [
    "training.learning_rate",
    "training.per_device_train_batch_size",
    "training.warmup_steps",
    "training.lr_scheduler_type",
    "training.optim",
    "training.weight_decay",
    "training.max_grad_norm",
    "training.gradient_accumulation_steps",
    "training.seed",
    "training.adam_epsilon",
    "training.logging_steps",
    "stages.0.topk",
    "stages.0.temperature",
    "stages.0.alpha",
    "stages.0.curriculum",
    "stages.0.teacher",
    "stages.1.name",
    "stages.0.cache_batch_size",
    "stages",
    "seed",
    "preset",
    "data.max_length",
    "data.packing",
    "data.pad_to_multiple_of",
    "processor.offline.vocab_size",
    "processor.offline.patch_size",
    "processor.offline.min_pixels",
    "processor.offline.merge_size",
    "processor",
    "models.student.dtype",
    "models.student.patch",
    "models.teacher.config.text_config.num_attention_heads",
    "models.teacher.config.text_config.hidden_size",
    "models.teacher.config.text_config.num_key_value_heads",
    "models.teacher.config.vision_config.num_heads",
    "models.teacher.config.vision_config.embed_dim",
    "models.student.config.text_config.vocab_size",
    "models.teacher.config.text_config.rope_parameters",
    "models.teacher",
]
VALUES = st.one_of(
    st.sampled_from(
        [
            "0",
            "1",
            "-1",
            "2",
            "7",
            "1e-5",
            "-1e-5",
            "0.5",
            "1.5",
            ".inf",
            ".nan",
            "null",
            "true",
            "abc",
            "[1, 2]",
            "{a: 1}",
            "[1,",
            "'3'",
            "cosine",
            "constant",
            "adafactor",
            "sgd",
            "nope",
            "store",
            "online",
            "bfloat16",
            "{attention: false}",
            "1000000",
            "{}",
            "[]",
            '"\\0"',
            "!!binary AA==",
            "2020-01-01",
        ]
    ),
    st.integers(-3, 70).map(str),
    st.floats(allow_nan=True).map(repr),
    st.text(max_size=8),
)


@settings(FAST, max_examples=60)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_random_overrides(capsys, project, overrides):
    """Random ``--set`` values on the keys a user touches: check passes, or one line naming what is wrong."""
    sets = [f"{k}={v}" for k, v in overrides] + ["output_dir=out-hunt"]
    ok_or_user_error(check(capsys, project, *sets))


PATH_KEYS = [
    "output_dir",
    "data.train",
    "data.root",
    "stages.0.store",
    "processor.from_pretrained",
    "models.student.from_pretrained",
]


@pytest.fixture(scope="module")
def paths(project):
    """Path strings a user could give: existing files, folders, things under a file, odd names."""
    folder = project["folder"]
    fifo = folder / "a_fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    return [
        str(project["file"]),
        str(project["dir"]),
        str(project["file"] / "sub"),
        str(folder / "new" / "x"),
        str(project["data"]),
        str(project["config"]),
        str(fifo),
        "/dev/null",
        "/proc/self/nope",
        "",
        ".",
        "..",
        "~",
        "x" * 300,
        str(folder / ("y" * 300) / "z"),
        str(project["latin1"]),
        "~/runs",
        "a\\0b",
    ]


@settings(FAST, max_examples=40)
@given(
    st.lists(st.tuples(st.sampled_from(PATH_KEYS), st.integers(0, 17)), min_size=1, max_size=2),
    st.sampled_from(["check", "distill"]),
)
def test_random_paths(capsys, project, paths, picks, command):
    """Random paths for every path key: check passes, or one line naming the key or the path (a FIFO is
    never opened: the test would hang)."""
    sets = [f'{k}="{paths[i]}"' for k, i in picks]
    ok_or_user_error(check(capsys, project, *sets, command=command))


_ARGUMENT = st.one_of(
    st.integers(-5, 5).map(str),
    st.sampled_from(["x", "", "1e3", "cpu", "cuda", "meta", "mps:0", "{}", "null", "[1]", '{"attention": 1}']),
)


@settings(FAST, max_examples=40)
@given(st.sampled_from(["predict", "eval", "data"]), st.data())
def test_random_arguments(capsys, project, paths, fake_model, command, data):
    """Random values and paths for every argument of predict, eval and data demo."""
    path = st.integers(0, 17).map(lambda i: paths[i])
    options = {
        "predict": {
            "--model": st.just(str(fake_model)) | path,
            "--data": st.just(str(project["data"])) | path,
            "--out": path,
            "--root": path,
            "--processor": path,
            "--patch": _ARGUMENT,
            "--batch-size": _ARGUMENT,
            "--max-new-tokens": _ARGUMENT,
            "--max-length": _ARGUMENT,
            "--device": _ARGUMENT,
            "--dtype": _ARGUMENT,
        },
        "eval": {"--pred": path, "--data": path, "--root": path, "--json": path},
        "data": {
            "--out": path,
            "--seed": _ARGUMENT,
            "--train-per-modality": _ARGUMENT,
            "--test-per-modality": _ARGUMENT,
        },
    }[command]
    chosen = data.draw(st.lists(st.sampled_from(sorted(options)), unique=True, max_size=4))
    argv = [command] + (
        ["demo", "--no-progress", "--train-per-modality", "1", "--test-per-modality", "1"] if command == "data" else []
    )
    for name in chosen:
        argv += [name, data.draw(options[name])]
    if command == "eval":
        argv.append("--no-meteor")
    ok_or_user_error(cli(capsys, *argv))


# ---- what check passes, train runs: the training arguments and the model configs behind check


def _parsed(project, **mapping_changes):
    from clinkd.train import parse_config

    mapping = yaml.safe_load(project["config"].read_text())
    mapping.update(mapping_changes)
    return parse_config(mapping, base_dir=project["folder"])


TRAINING = st.fixed_dictionaries(
    {},
    optional={
        "learning_rate": st.sampled_from([0, 1e-3, 1.0, -1e-3, 1e30, "x"]),
        "weight_decay": st.sampled_from([0, 0.1, -0.1]),
        "adam_beta1": st.sampled_from([0.0, 0.9, 1.0, -0.1]),
        "adam_epsilon": st.sampled_from([0.0, 1e-8, -1e-8]),
        "max_grad_norm": st.sampled_from([0.0, 1.0, -1.0]),
        "warmup_steps": st.sampled_from([0, 1, 0.5, -1, 1.5]),
        "lr_scheduler_type": st.sampled_from(
            [
                "linear",
                "cosine",
                "constant",
                "constant_with_warmup",
                "polynomial",
                "cosine_with_min_lr",
                "inverse_sqrt",
                "reduce_lr_on_plateau",
                "nope",
            ]
        ),
        "lr_scheduler_kwargs": st.sampled_from([{}, {"min_lr": 1e-5}, {"bogus": 1}, {"power": 2.0}]),
        "optim": st.sampled_from(["adamw_torch", "sgd", "adafactor", "adagrad", "rmsprop", "nope"]),
        "gradient_accumulation_steps": st.sampled_from([1, 2, 0]),
        "per_device_train_batch_size": st.sampled_from([1, 2, 0, 2.5]),
        "seed": st.sampled_from([0, 7, -1, 2**40]),
        "logging_steps": st.sampled_from([1, 0.5, 0, -1]),
    },
)


class _Regression(__import__("torch").nn.Module):
    def __init__(self):
        import torch

        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def forward(self, x, labels):
        return {"loss": ((self.w(x).squeeze(-1) - labels) ** 2).mean()}


@settings(FAST, max_examples=15)
@given(TRAINING)
def test_training_arguments_check_passes_then_steps_run(project, tmp_path_factory, training):
    """TrainingArguments values check refuses (ConfigError naming the key or the stage), or a Trainer built
    from exactly those arguments runs its first steps (optimizer, schedule, clipping) without error."""
    import torch
    from transformers import Trainer

    from clinkd.train import ConfigError
    from clinkd.train.arguments import training_arguments
    from clinkd.train.checks import check_training_arguments

    base = {"use_cpu": True, "save_strategy": "no", "max_steps": 3, "report_to": "none", "dataloader_num_workers": 0}
    try:
        config = _parsed(project, training={**base, **training})
        check_training_arguments(config)
    except ConfigError as e:
        assert re.search(r"config\.(training\.\w+|stages\[\d\]\.training)", str(e)), e
        return
    args = training_arguments(
        config, config.stages[0], progress=False, output_dir=str(tmp_path_factory.mktemp("trainer"))
    )
    data = [{"x": torch.randn(2), "labels": torch.randn(())} for _ in range(8)]
    trainer = Trainer(model=_Regression(), args=args, train_dataset=data)
    trainer.train()
    assert trainer.state.global_step == args.max_steps


def _text_config(hidden, heads, kv, section):
    return {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
    }


def _mostly(good, bad):
    """``good`` three times out of four, else ``bad`` (so that many drawn configs are valid)."""
    return st.integers(0, 3).flatmap(lambda i: bad if i == 3 else good)


_HEAD_DIMS = {8: [1, 1, 2], 12: [2, 2, 2], 16: [2, 3, 3]}  # head_dim → an M-RoPE section summing to head_dim / 2


@st.composite
def MODELS(draw):
    """Qwen2-VL configs of plausible shapes, with a field now and then out of shape."""
    head_dim = draw(st.sampled_from(sorted(_HEAD_DIMS)))
    kv = draw(_mostly(st.sampled_from([1, 2]), st.integers(0, 5)))
    heads = draw(_mostly(st.sampled_from([kv, 2 * kv]), st.integers(0, 6)))
    hidden = draw(_mostly(st.just(head_dim * max(heads, 1)), st.sampled_from([0, -8, 20, 40, 64])))
    section = draw(
        _mostly(
            st.just(_HEAD_DIMS[head_dim]), st.sampled_from([[4, 4], [0, 4, 4], [2, 2, 2], [4, 2, 2], [-1, 5, 4], []])
        )
    )
    vheads = draw(_mostly(st.sampled_from([1, 2]), st.integers(0, 5)))
    embed = draw(_mostly(st.just(16 * vheads), st.sampled_from([0, 24, 20, 12])))
    vhidden = draw(_mostly(st.just(hidden), st.sampled_from([16, 40])))
    return {
        "text_config": _text_config(hidden, heads, kv, section),
        "vision_config": {
            "depth": 1,
            "embed_dim": embed,
            "hidden_size": vhidden,
            "num_heads": vheads,
            "patch_size": tiny.PATCH,
            "spatial_merge_size": tiny.MERGE,
            "temporal_patch_size": tiny.TEMPORAL,
            "in_channels": 3,
            "mlp_ratio": 2,
        },
    }


@settings(FAST, max_examples=30)
@given(MODELS())
def test_model_config_check_passes_then_forward_runs(project, model_mapping):
    """Random shapes of a model config: the checks of prepare_run refuse it (ConfigError naming the config
    or a field of it), or the model builds and runs a forward pass on a real sample."""
    import torch
    from transformers import AutoModelForImageTextToText

    from clinkd.train import ConfigError
    from clinkd.train.checks import check_architecture, check_buildable
    from clinkd.train.config import model_spec
    from clinkd.train.models import model_config

    where = "config.models.teacher"
    try:
        spec = model_spec(where, {"config": copy.deepcopy(model_mapping)}, default_patch=False)
        cfg = model_config(spec, tiny.processor().tokenizer, where)
        check_architecture(cfg, f"{where}.config")
        check_buildable(cfg, f"{where}.config")
    except ConfigError as e:
        assert str(e).startswith(f"{where}.config"), e
        return
    dataset = _samples(project)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg).eval()
    batch = tiny.collator()([dataset[0], dataset[1]])
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "sample_index"})
    assert torch.isfinite(out.logits).all()


_SAMPLES = {}


def _samples(project):
    from clinkd.data import build_dataset

    if "dataset" not in _SAMPLES:
        _SAMPLES["dataset"] = build_dataset(project["data"], tiny.processor(), max_length=512)
    return _SAMPLES["dataset"]
