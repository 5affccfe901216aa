"""Bootstrap intervals of the Med-GRIT scores: the values are evaluate()'s, the intervals have the width
the sampling error predicts, pairing narrows differences, identical models differ by exactly 0, and bad
input is refused. METEOR's cached scorer equals pycocoevalcap's own call."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from clinkd.eval.bootstrap import bootstrap_intervals
from clinkd.eval.evaluate import Row, evaluate, gather
from clinkd.eval.metrics import MeteorScorer, meteor_available

BOX = "<box>(0.100,0.100),(0.500,0.500)</box>"
WORDS = "a small large round lesion mass nodule tumor cyst in the left right upper lower lobe lung liver".split()
COLUMNS = [
    ("VG", "Recall@0.5"),
    ("ROC", "Accuracy"),
    ("RC", "BLEU-4"),
    ("RC", "CIDEr"),
    ("RC", "ROUGE-L"),
    ("MIA", "BLEU-1"),
    ("MIA", "ROUGE-L"),
    ("MIA", "METEOR"),
    ("MIA", "mBMR"),
]


def _sentence(n: int) -> str:
    return " ".join(random.choices(WORDS, k=n))


def _data_and_predictions(tmp_path, models: int = 2, per_group: int = 6):
    """A test file over 2 modalities × 4 tasks, and one predictions file per model (random answers)."""
    truth, preds = [], [[] for _ in range(models)]
    for modality in ("ct", "mr"):
        for task in ("VG", "ROC", "RC", "MIA"):
            for i in range(per_group):
                sid = f"{modality}_{task}{i}"
                answer = BOX if task == "VG" else _sentence(2 if task == "ROC" else 8)
                truth.append({"id": sid, "task": task, "conversations": [["q", answer]]})
                for p in preds:
                    if task == "VG":
                        response = random.choice([BOX, "(0.6,0.6),(0.9,0.9)"])
                    else:
                        response = random.choice([answer, _sentence(8)])
                    p.append({"id": sid, "response": response})
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in truth))
    files = []
    for m, p in enumerate(preds):
        random.shuffle(p)  # pairing is by (id, turn), not by line order
        files.append(tmp_path / f"p{m}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in p))
    return data, files


@pytest.fixture(scope="module")
def meteor():
    if not meteor_available():
        yield None
        return
    with MeteorScorer() as scorer:
        yield scorer


def test_values_are_evaluates_and_intervals_hold_them(tmp_path, meteor):
    data, files = _data_and_predictions(tmp_path)
    rows = {f"m{i}": gather(f, data)[0] for i, f in enumerate(files)}
    ci = bootstrap_intervals(rows, COLUMNS, resamples=100, meteor_scorer=meteor)
    for i, f in enumerate(files):
        report = evaluate(f, data, meteor_scorer=meteor, with_meteor=meteor is not None)
        for task, metric in COLUMNS:
            want = report["tasks"][task]["macro"][metric]
            block = ci["models"][f"m{i}"][task][metric]
            if want is None:  # METEOR without Java
                assert block["value"] is None and block["interval"] is None
                continue
            assert block["value"] == pytest.approx(want, rel=1e-12, abs=1e-12)
            low, high = block["interval"]
            assert low <= high and low - 1e-9 <= want <= high + 1e-9, (task, metric, want, block)
    assert ci["resamples"] == 100 and ci["confidence"] == 0.95
    assert bootstrap_intervals(rows, COLUMNS, resamples=20, seed=3, meteor_scorer=meteor) == bootstrap_intervals(
        rows, COLUMNS, resamples=20, seed=3, meteor_scorer=meteor
    )  # deterministic


def _rows(task: str, correct: list[bool], modality: str = "ct") -> list[Row]:
    return [
        Row(task, modality, "liver tumor" if ok else "cyst", "liver tumor", f"p:{i}", (f"{modality}_{i}", 0))
        for i, ok in enumerate(correct)
    ]


def test_interval_width_is_the_sampling_error_of_an_accuracy():
    """One group of n questions at accuracy p: the 95 % interval is about p ± 1.96·sqrt(p(1 − p)/n)."""
    n, p = 400, 0.3
    correct = [i < p * n for i in range(n)]
    random.shuffle(correct)
    ci = bootstrap_intervals({"a": _rows("ROC", correct)}, [("ROC", "Accuracy")], resamples=2000, seed=1)
    low, high = ci["models"]["a"]["ROC"]["Accuracy"]["interval"]
    half = 100 * 1.96 * (p * (1 - p) / n) ** 0.5
    assert ci["models"]["a"]["ROC"]["Accuracy"]["value"] == pytest.approx(100 * p)
    assert low == pytest.approx(100 * p - half, abs=0.25 * half) and high == pytest.approx(
        100 * p + half, abs=0.25 * half
    )


def test_paired_differences():
    """Two models right on the same questions but one: their paired difference has a narrow interval
    (the questions they share cancel), much narrower than either model's own; a model against itself
    differs by exactly 0; a model right everywhere is clearly ahead of one right nowhere."""
    n = 200
    a = [random.random() < 0.5 for _ in range(n)]
    b = list(a)
    b[a.index(True)] = False
    rows = {"a": _rows("ROC", a), "b": _rows("ROC", b), "same": _rows("ROC", a)}
    ci = bootstrap_intervals(rows, [("ROC", "Accuracy")], resamples=500, seed=0)
    diff = ci["differences"]["a - b"]["ROC"]["Accuracy"]
    own = ci["models"]["a"]["ROC"]["Accuracy"]["interval"]
    assert diff["value"] == pytest.approx(100 / n)
    assert diff["interval"][1] - diff["interval"][0] < 0.2 * (own[1] - own[0])
    assert ci["differences"]["a - same"]["ROC"]["Accuracy"] == {"value": 0.0, "interval": [0.0, 0.0], "clear": False}
    extremes = {"right": _rows("ROC", [True] * 20), "wrong": _rows("ROC", [False] * 20)}
    clear = bootstrap_intervals(extremes, [("ROC", "Accuracy")], resamples=100)["differences"]["right - wrong"]
    assert clear["ROC"]["Accuracy"] == {"value": 100.0, "interval": [100.0, 100.0], "clear": True}


def test_strata_keep_their_size():
    """Resampling inside each modality: a modality with every answer right stays at 100 in every draw,
    so the macro interval's low end is (100 + the other modality's low end) / 2, never below 50."""
    rows = _rows("ROC", [True] * 10, "ct") + _rows("ROC", [False] * 10, "mr")
    ci = bootstrap_intervals({"a": rows}, [("ROC", "Accuracy")], resamples=200)
    assert ci["models"]["a"]["ROC"]["Accuracy"] == {"value": 50.0, "interval": [50.0, 50.0]}


def test_bad_input():
    rows = _rows("ROC", [True, False])
    with pytest.raises(ValueError, match="cover different questions"):
        bootstrap_intervals({"a": rows, "b": rows[:1]}, [("ROC", "Accuracy")])
    with pytest.raises(ValueError, match="resamples must be a positive integer"):
        bootstrap_intervals({"a": rows}, [("ROC", "Accuracy")], resamples=0)
    with pytest.raises(ValueError, match="confidence must be in"):
        bootstrap_intervals({"a": rows}, [("ROC", "Accuracy")], confidence=95)


@pytest.mark.skipif(not meteor_available(), reason="METEOR needs Java")
def test_cached_meteor_equals_pycocoevalcap(meteor):
    """Against pycocoevalcap's compute_score on the same jar process (it sends every SCORE request anew)."""
    hyps = [_sentence(random.randint(3, 9)) for _ in range(7)]
    refs = [[_sentence(random.randint(3, 9))] for _ in range(7)]
    own = meteor._meteor
    want, _ = own.compute_score({i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)})
    assert meteor(hyps, refs) == want
    draw = np.random.default_rng(0).integers(0, 7, 7)  # a resample: repeats served from the cache
    want, _ = own.compute_score({i: refs[j] for i, j in enumerate(draw)}, {i: [hyps[j]] for i, j in enumerate(draw)})
    assert meteor([hyps[j] for j in draw], [refs[j] for j in draw]) == want
