"""An rct stage's configuration through ``clinkd check``: good keys pass, each bad one is one line
naming the key (exit 2)."""

from __future__ import annotations

import pytest
import yaml

from clinkd.cli import main
from clinkd.train import load_config
from tests.rct.helpers import rct_config
from tests.train import setup


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("config")
    return rct_config(folder, setup.tiny.make_data(folder / "data", 4, seed=1))


def _with(config_file, tmp_path, **rct):
    mapping = yaml.safe_load(config_file.read_text())
    mapping["output_dir"] = str(tmp_path / "out")
    mapping["stages"][1].update(rct)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


def test_a_good_rct_config_passes_check(config_file, tmp_path, capsys):
    assert main(["check", "--config", str(_with(config_file, tmp_path))]) == 0
    stage = load_config(_with(config_file, tmp_path, similarity_threshold=0.7, sample=0.5)).stages[1]
    assert stage.type == "rct" and stage.rct.thresholds.similarity == 0.7 and stage.rct.sample == 0.5


@pytest.mark.parametrize(
    "rct, key",
    [
        ({"similarity_threshold": 1.5}, "config.stages[1].similarity_threshold must be <= 1"),
        ({"similarity_threshold": -0.1}, "config.stages[1].similarity_threshold must be >= 0"),
        ({"iou_threshold": 2}, "config.stages[1].iou_threshold must be <= 1"),
        ({"candidates": 0}, "config.stages[1].candidates must be an integer >= 1"),
        ({"rounds": 0}, "config.stages[1].rounds"),
        ({"template": "Fix this: {answer}"}, "config.stages[1].template has no {ground_truth} slot"),
        ({"template": "{ground_truth} {why}"}, "config.stages[1].template has unknown slot(s) {why}"),
        (
            {"similarity": {"model": "/nonexistent/embedder"}},
            "config.stages[1].similarity.model: similarity model '/nonexistent/embedder' is neither a folder",
        ),
        ({"similarity": {"model": "no-such-embedder-package"}}, "config.stages[1].similarity.model"),
        ({"similarity": {"fallback": "bleu"}}, "config.stages[1].similarity.fallback"),
        ({"similarity": {"mdoel": "x"}}, "config.stages[1].similarity: unknown key(s) mdoel"),
        ({"mode": "merge"}, "config.stages[1].mode"),
        ({"every": "steps"}, "config.stages[1].steps"),
        ({"topk": 8}, "config.stages[1]: unknown key(s) topk"),
    ],
)
def test_bad_rct_keys_are_one_line_naming_the_key(config_file, tmp_path, capsys, rct, key):
    if rct.get("every") == "steps":
        rct = dict(rct, steps=None)
    assert main(["check", "--config", str(_with(config_file, tmp_path, **rct))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("clinkd check: error: ") and key in err, err


def test_a_missing_model_is_accepted_with_the_lexical_fallback_or_rouge_l(config_file, tmp_path):
    fallback = {"model": "/nonexistent/embedder", "fallback": "rouge-l"}
    assert main(["check", "--config", str(_with(config_file, tmp_path, similarity=fallback))]) == 0
    assert main(["check", "--config", str(_with(config_file, tmp_path, similarity={"model": "rouge-l"}))]) == 0
