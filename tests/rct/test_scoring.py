"""Answer scores, the task rules that judge them, and SASG's choice among candidates."""

from __future__ import annotations

import itertools
import random

import pytest

from clinkd.rct.scoring import (
    Thresholds,
    box_score,
    boxes,
    components,
    judged,
    problems,
    score_answers,
    select,
    target_problem,
    text_part,
)


def _box(b):
    return "<|box_start|>({:.3f},{:.3f}),({:.3f},{:.3f})<|box_end|>".format(*b)


def _iou64(a, b):  # float64 reference, written independently of clinkd.eval.metrics.box_iou
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _random_box(rng):
    x1, y1 = rng.uniform(0, 0.7), rng.uniform(0, 0.7)
    return (round(x1, 3), round(y1, 3), round(rng.uniform(x1 + 0.05, 1), 3), round(rng.uniform(y1 + 0.05, 1), 3))


class ConstantSimilarity:
    """Scores looked up from a table (the rules are tested apart from any embedding model)."""

    name = "table"

    def __init__(self, table=None, default=0.0):
        self.table, self.default = table or {}, default

    def __call__(self, texts, references):
        import torch

        return torch.tensor(
            [self.table.get((t, r), 1.0 if t == r else self.default) for t, r in zip(texts, references)]
        )


def test_one_box_each_scores_their_iou():
    rng = random.Random(0)
    for _ in range(200):
        a, b = _random_box(rng), _random_box(rng)
        assert box_score(_box(a), _box(b)) == pytest.approx(_iou64(a, b), abs=1e-12)


def test_several_boxes_are_matched_one_to_one_in_any_order():
    rng = random.Random(1)
    for n_ref, n_pred in [(2, 2), (3, 3), (2, 3), (3, 2), (1, 3), (4, 1)]:
        ref = [_random_box(rng) for _ in range(n_ref)]
        pred = [_random_box(rng) for _ in range(n_pred)]
        best = max(
            sum(_iou64(pred[i], ref[j]) for i, j in zip(order, range(n_ref)) if i is not None)
            for order in itertools.permutations(list(range(n_pred)) + [None] * n_ref, n_ref)
        )
        expected = best / max(n_ref, n_pred)
        got = box_score(" and ".join(map(_box, pred)), "; ".join(map(_box, ref)))
        assert got == pytest.approx(expected, abs=1e-12)
        shuffled = pred[::-1]
        assert box_score(" ".join(map(_box, shuffled)), " ".join(map(_box, ref))) == pytest.approx(expected, abs=1e-12)


def test_exact_boxes_score_one_and_missing_or_extra_boxes_cost_a_box():
    a, b = (0.1, 0.1, 0.4, 0.4), (0.5, 0.5, 0.9, 0.9)
    assert box_score(_box(a) + _box(b), _box(b) + _box(a)) == pytest.approx(1.0)
    assert box_score(_box(a), _box(a) + _box(b)) == pytest.approx(0.5)  # one of two found
    assert box_score(_box(a) + _box(b), _box(a)) == pytest.approx(0.5)  # one extra box
    assert box_score("no box at all", _box(a)) == 0.0
    assert box_score(_box(a), "liver tumor") is None  # the reference names no box


def test_boxes_read_either_corner_order_and_the_0_1000_grid():
    assert boxes("(0.4,0.4),(0.1,0.1)") == [(0.1, 0.1, 0.4, 0.4)]
    assert boxes("<|box_start|>(100,200),(300,400)<|box_end|>") == [(0.1, 0.2, 0.3, 0.4)]
    assert box_score("(400,400),(100,100)", _box((0.1, 0.1, 0.4, 0.4))) == pytest.approx(1.0)
    assert box_score("(0.2,0.2),(0.2,0.5)", _box((0.2, 0.2, 0.2, 0.5))) == 0.0  # no area: a miss


def test_components_and_judged_rules_per_task():
    box = _box((0.1, 0.1, 0.5, 0.5))
    assert components("VG", box) == ("iou",) and judged("VG", box) == ("iou",)
    assert components("ROC", "liver tumor") == ("words", "similarity") and judged("ROC", "liver tumor") == ("words",)
    assert judged("RC", "a large cyst") == ("similarity",)
    assert judged("MIA", f"a cyst at {box}") == ("iou", "similarity")  # a grounded description
    assert text_part(f"a cyst at {box} here") == "a cyst at here"


def test_problems_at_the_thresholds():
    t = Thresholds(similarity=0.8, iou=0.5)
    box = _box((0.0, 0.0, 0.5, 0.5))
    assert problems("VG", box, {"iou": 0.5}, t) == ["box score 0.500 <= 0.5"]  # IoU <= 0.5 is wrong
    assert problems("VG", box, {"iou": 0.5000001}, t) == []
    assert problems("RC", "a cyst", {"similarity": 0.8}, t) == []  # at τ: right
    assert problems("RC", "a cyst", {"similarity": 0.7999}, t) == ["similarity 0.800 < 0.8"]
    assert problems("ROC", "cyst", {"words": 0.0, "similarity": 0.99}, t) == ["a ground-truth word is missing"]
    assert problems("ROC", "cyst", {"words": 1.0, "similarity": 0.0}, t) == []  # ROC: the word rule alone


def test_score_answers_calls_similarity_once_for_the_text_answers():
    calls = []

    class Counting(ConstantSimilarity):
        def __call__(self, texts, references):
            calls.append((list(texts), list(references)))
            return super().__call__(texts, references)

    box = _box((0.1, 0.1, 0.5, 0.5))
    scores = score_answers(
        ["VG", "ROC", "RC"], [box, "the liver", "a cyst"], [box, "liver", "a big cyst"], Counting(default=0.3)
    )
    assert scores == [
        {"iou": pytest.approx(1.0)},
        {"words": 1.0, "similarity": pytest.approx(0.3)},
        {"similarity": pytest.approx(0.3)},
    ]
    assert calls == [(["the liver", "a cyst"], ["liver", "a big cyst"])]


def test_select_picks_the_best_passing_candidate():
    t = Thresholds()
    sims = ConstantSimilarity({("c0", "truth"): 0.95, ("c1", "truth"): 0.99, ("c2", "truth"): 0.5})
    candidates = ["c0", "c1", "c2"]
    scores = score_answers(["RC"] * 3, candidates, ["truth"] * 3, sims)
    choice = select("RC", "truth", candidates, scores, t)
    assert (choice["choice"], choice["index"], choice["text"]) == ("candidate", 1, "c1")
    assert choice["passes"] == [True, True, False] and choice["reasons"][2] == ["similarity 0.500 < 0.9"]


def test_select_breaks_ties_by_order_and_needs_every_judged_component():
    t = Thresholds()
    box, far = _box((0.1, 0.1, 0.5, 0.5)), _box((0.6, 0.6, 0.9, 0.9))
    truth = f"a cyst {box}"
    sims = ConstantSimilarity(default=0.9)
    candidates = [f"a cyst {far}", f"a cyst {box}", f"a cyst {box}"]
    scores = score_answers(["MIA"] * 3, candidates, [truth] * 3, sims)
    choice = select("MIA", truth, candidates, scores, t)
    assert choice["index"] == 1 and choice["passes"] == [False, True, True]  # the first fails on its box


def test_select_falls_back_to_the_ground_truth():
    t = Thresholds()
    choice = select("ROC", "liver", ["kidney", "spleen"], [{"words": 0.0, "similarity": 0.9}] * 2, t)
    assert choice["choice"] == "ground_truth" and choice["index"] is None and choice["text"] == "liver"
    assert "none of the 2" in choice["why"]


def test_a_candidate_that_cannot_be_trained_on_never_passes():
    t = Thresholds()
    for bad in ["liver <|im_end|>", "liver <box>(0.1,0.1)</box>", "liver <|box_start|>(0.1,0.1),(0.5,0.5)", "   "]:
        assert target_problem(bad) is not None
        choice = select("ROC", "liver", [bad], [{"words": 1.0, "similarity": 1.0}], t)
        assert choice["choice"] == "ground_truth", bad
    assert target_problem("the liver <|box_start|>(0.1,0.1),(0.5,0.5)<|box_end|>") is None


def test_thresholds_outside_zero_one_are_refused():
    for bad in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="threshold"):
            Thresholds(similarity=bad)
        with pytest.raises(ValueError, match="threshold"):
            Thresholds(iou=bad)
