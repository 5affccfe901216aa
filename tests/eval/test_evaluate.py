"""Scoring a predictions file: per-modality and macro averages, and bad input with line numbers."""

import json
import sys

import pytest

from clinkd.cli import main
from clinkd.data.records import DataError
from clinkd.eval.evaluate import evaluate, format_report

BOX = "<box>(0.100,0.100),(0.500,0.500)</box>"


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _truth(tmp_path):
    rows = [
        {"id": "ct_1", "task": "VG", "conversations": [["Where is the tumor?", BOX]]},
        {"id": "ct_2", "task": "VG", "conversations": [["Where is the cyst?", BOX]]},
        {"id": "x_1", "task": "VG", "conversations": [["Where is the nodule?", BOX]]},
        {"id": "ct_3", "task": "ROC", "conversations": [[f"What is in {BOX}?", "liver tumor"]]},
        {"id": "mr_1", "task": "ROC", "conversations": [[f"What is in {BOX}?", "edema"]]},
        {"id": "mr_2", "task": "ROC", "conversations": [[f"What is in {BOX}?", "brain tumor"]]},
        {"id": "mr_3", "task": "MIA", "conversations": [["Describe.", "a small brain tumor in the left"]]},
        {"id": "x_2", "task": "MIA", "conversations": [["Describe.", "a large nodule in the right lung"]]},
    ]
    return _write(tmp_path / "test.jsonl", rows)


def test_macro_average_over_modalities(tmp_path):
    data = _truth(tmp_path)
    preds = _write(
        tmp_path / "p.jsonl",
        [
            {"id": "ct_1", "response": "<|box_start|>(0.5,0.5),(0.1,0.1)<|box_end|>"},  # swapped: hit
            {"id": "ct_2", "response": "somewhere"},  # unparsable: miss
            {"id": "x_1", "response": "(0.1,0.1),(0.5,0.5)"},  # untagged: hit
            {"id": "ct_3", "response": "Liver tumor."},
            {"id": "mr_1", "response": "edema"},
            {"id": "mr_2", "response": "tumor"},  # missing a word
            {"id": "mr_3", "response": "a small brain tumor in the left"},
            {"id": "x_2", "response": "a small nodule in the left lung"},
        ],
    )
    report = evaluate(preds, data, with_meteor=False)
    vg, roc = report["tasks"]["VG"], report["tasks"]["ROC"]
    assert vg["per_modality"]["ct"] == {"Recall@0.5": 50.0, "n": 2}
    assert vg["per_modality"]["x"]["Recall@0.5"] == 100.0
    assert vg["macro"]["Recall@0.5"] == pytest.approx(75.0)  # macro, not the 2/3 micro average
    assert roc["per_modality"]["mr"]["Accuracy"] == 50.0 and roc["macro"]["Accuracy"] == pytest.approx(75.0)
    mia = report["tasks"]["MIA"]
    assert mia["per_modality"]["mr"]["BLEU-4"] == pytest.approx(100.0)
    assert mia["per_modality"]["x"]["BLEU-1"] == pytest.approx(100.0 * 5 / 7)
    assert mia["macro"]["BLEU-1"] == pytest.approx((100.0 + 100.0 * 5 / 7) / 2)
    assert mia["macro"]["METEOR"] is None and report["meteor"] == "not requested"
    assert "RC" not in report["tasks"] and report["missing"] == 0
    assert "| **macro** |" in format_report(report)


def test_missing_predictions_are_counted(tmp_path):
    data = _truth(tmp_path)
    preds = _write(tmp_path / "p.jsonl", [{"id": "ct_1", "response": BOX}])
    report = evaluate(preds, data, with_meteor=False)
    assert report["missing"] == 7 and report["n"] == 1


def test_without_data_file(tmp_path):
    preds = _write(
        tmp_path / "p.jsonl",
        [
            {"id": "fundus_1", "response": "exudate", "annotation": "exudate", "task": "roc"},
            {"id": "a_1", "modality": "Dermoscopy", "response": "mole", "annotation": "nevus", "task": "ROC"},
        ],
    )
    report = evaluate(preds, with_meteor=False)
    per = report["tasks"]["ROC"]["per_modality"]
    assert per["fundus"]["Accuracy"] == 100.0 and per["dermoscopy"]["Accuracy"] == 0.0


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", r"p.jsonl:2: not valid JSON"),
        ('["a list"]', r"p.jsonl:2: a prediction must be a JSON object"),
        ('{"response": "x"}', r"p.jsonl:2: missing field 'id'"),
        ('{"id": "ct_1"}', r"p.jsonl:2: missing field 'response'"),
        ('{"id": "ct_1", "response": 3}', r"p.jsonl:2: field 'response' must be a string"),
        ('{"id": "ct_1", "response": "x", "turn": -1}', r"p.jsonl:2: field 'turn'"),
        ('{"id": "ct_9", "response": "x"}', r"p.jsonl:2: id 'ct_9' turn 0 is not in the data"),
        ('{"id": "ct_2", "response": "x"}', r"p.jsonl:2: id 'ct_2' turn 0 repeats the prediction at .*p.jsonl:1"),
    ],
)
def test_bad_prediction_lines_name_the_line(tmp_path, line, match):
    data = _truth(tmp_path)
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "ct_2", "response": "x"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=match):
        evaluate(preds, data, with_meteor=False)


@pytest.mark.parametrize(
    "row, match",
    [
        ({"id": "ct_1", "response": "x", "task": "VG"}, r":1: missing string field 'annotation'"),
        ({"id": "ct_1", "response": "x", "annotation": "y"}, r":1: missing string field 'task'"),
        ({"id": "ct_1", "response": "x", "annotation": "y", "task": "SEG"}, r":1: unknown task 'SEG'"),
        ({"id": "xray_1", "response": "x", "annotation": "y", "task": "ROC"}, r":1: unknown modality 'xray'"),
        ({"id": "ct_1", "response": "x", "annotation": "no box", "task": "VG"}, r":1: the VG reference"),
    ],
)
def test_bad_lines_without_data(tmp_path, row, match):
    preds = _write(tmp_path / "p.jsonl", [row])
    with pytest.raises(DataError, match=match):
        evaluate(preds, with_meteor=False)


def test_unknown_modality_in_data(tmp_path):
    data = _write(
        tmp_path / "d.jsonl",
        [
            {"id": "ct_1", "task": "ROC", "conversations": [["q", "a"]]},
            {"id": "sonar_1", "task": "ROC", "conversations": [["q", "a"]]},
        ],
    )
    preds = _write(tmp_path / "p.jsonl", [{"id": "ct_1", "response": "a"}])
    with pytest.raises(DataError, match=r"d.jsonl:2 .*unknown modality 'sonar'"):
        evaluate(preds, data, with_meteor=False)


def test_cli_eval(tmp_path, capsys):
    data = _truth(tmp_path)
    preds = _write(tmp_path / "p.jsonl", [{"id": "ct_3", "response": "liver tumor"}])
    out = tmp_path / "r.json"
    assert main(["eval", "--pred", str(preds), "--data", str(data), "--no-meteor", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"]["ROC"]["macro"]["Accuracy"] == 100.0
    assert "### ROC" in capsys.readouterr().out
    bad = _write(tmp_path / "bad.jsonl", ['{"id": "ct_3"'])
    assert main(["eval", "--pred", str(bad), "--data", str(data)]) == 2
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().err
    assert main(["eval", "--pred", str(tmp_path / "none.jsonl")]) == 2


def test_cli_eval_without_pycocoevalcap(tmp_path, capsys, monkeypatch):
    """RC/MIA scores need pycocoevalcap: without it, a one-line error naming the extra, exit 2, no traceback."""
    data = _write(tmp_path / "d.jsonl", [{"id": "ct_1", "task": "MIA", "conversations": [["q", "a small lesion"]]}])
    preds = _write(tmp_path / "p.jsonl", [{"id": "ct_1", "response": "a lesion"}])
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # import pycocoevalcap → ImportError
    assert main(["eval", "--pred", str(preds), "--data", str(data), "--no-meteor"]) == 2
    assert "pip install 'clinkd[eval]'" in capsys.readouterr().err
