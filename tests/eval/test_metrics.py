"""Med-GRIT metrics on hand-made predictions with known answers, and against pycocoevalcap."""

import pytest

from clinkd.eval import metrics as M


def test_iou_known_values():
    assert M.box_iou((0, 0, 0.5, 0.5), (0, 0, 0.5, 0.5)) == pytest.approx(1.0)
    assert M.box_iou((0, 0, 0.5, 0.5), (0.25, 0, 0.75, 0.5)) == pytest.approx(1 / 3)
    assert M.box_iou((0, 0, 0.5, 0.5), (0.5, 0, 1.0, 0.5)) == 0.0  # touching edge
    assert M.box_iou((0, 0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)) == 0.0  # touching corner
    assert M.box_iou((0.2, 0.2, 0.2, 0.6), (0.1, 0.1, 0.9, 0.9)) == 0.0  # no area


def test_parse_box_forms():
    assert M.parse_box("<|box_start|>(0.1,0.2),(0.3,0.4)<|box_end|>") == (0.1, 0.2, 0.3, 0.4)
    assert M.parse_box("<box>(0.3,0.4),(0.1,0.2)</box>") == (0.1, 0.2, 0.3, 0.4)  # swapped corners
    assert M.parse_box("at (0.3,0.2),(0.1,0.4) it is") == (0.1, 0.2, 0.3, 0.4)  # mixed swap, no tags
    assert M.parse_box("(100,200),(300,400)") == pytest.approx((0.1, 0.2, 0.3, 0.4))  # 0..1000 grid
    for bad in ("no box here", "(0.1,0.2)", "", "<|box_start|>(a,b),(c,d)<|box_end|>"):
        assert M.parse_box(bad) is None


def test_vg_hit_edges():
    ref = "<|box_start|>(0.0,0.0),(0.5,0.5)<|box_end|>"
    assert M.vg_hit("<|box_start|>(0.5,0.5),(0.0,0.0)<|box_end|>", ref)  # swapped, IoU 1
    assert not M.vg_hit("<|box_start|>(0.5,0.0),(1.0,0.5)<|box_end|>", ref)  # touching, IoU 0
    assert not M.vg_hit("I cannot find it", ref)  # unparsable = miss
    # IoU exactly 0.5 is not > 0.5: a box of half the area inside the reference
    assert not M.vg_hit("(0.0,0.0),(0.25,0.5)", ref)
    assert M.vg_hit("(0.0,0.0),(0.26,0.5)", ref)
    with pytest.raises(ValueError, match="reference"):
        M.vg_hit("(0,0),(1,1)", "no box")


def test_roc_correct():
    assert M.roc_correct("It is the Liver.", "liver")
    assert M.roc_correct("left kidney", "kidney left")
    assert not M.roc_correct("kidney", "left kidney")
    assert not M.roc_correct("livers", "liver")  # whole words only


def test_bleu_rouge_cider_known_values():
    h = ["a b c d"]
    assert M.bleu(h, [["a b c d"]]) == pytest.approx([1.0] * 4)
    # one of four unigrams wrong, same length: BLEU-1 = 3/4, BLEU-2 = sqrt(3/4 * 2/3)
    b = M.bleu(["a b c x"], [["a b c d"]])
    assert b[0] == pytest.approx(0.75) and b[1] == pytest.approx((0.75 * 2 / 3) ** 0.5)
    # LCS 2 of hypothesis 2, reference 4: P=1, R=0.5 → F_1.2 = 2.44*0.5/(0.5+1.44)
    assert M.rouge_l(["a c"], [["a b c d"]]) == pytest.approx(2.44 * 0.5 / (0.5 + 1.44))
    # disjoint exact matches: cosine 1 for every n, no length penalty → 10; 2-word captions have no
    # 3- and 4-grams, so half of that
    assert M.cider(["a b c d", "e f g h"], [["a b c d"], ["e f g h"]]) == pytest.approx(10.0)
    assert M.cider(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx(5.0)


def test_caption_metrics_are_pycocoevalcap_on_tokenised_words():
    """caption_metrics tokenises raw answers (case, tags, punctuation) and hands the words to
    pycocoevalcap: the same scores as calling it directly on the hand-tokenised text."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    hyps = ["The <ref>Liver</ref> shows a small, round lesion.", "Left kidney: normal.", "A bright mass."]
    refs = [
        ["the liver shows a round lesion", "small lesion in the liver"],
        ["left kidney is normal"],
        ["a dark mass near the kidney"],
    ]
    clean = ["the liver shows a small round lesion", "left kidney normal", "a bright mass"]
    gts, res = {i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(clean)}
    ours = M.caption_metrics(hyps, [[r.capitalize() + "." for r in rs] for rs in refs], with_meteor=False)
    assert [ours[f"BLEU-{k}"] for k in range(1, 5)] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0])
    assert ours["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert 0 < ours["BLEU-1"] < 1 and ours["CIDEr"] > 0


def test_caption_metrics_meteor_unavailable(monkeypatch):
    monkeypatch.setattr(M.shutil, "which", lambda name: None)  # no java on PATH
    out = M.caption_metrics(["a small lesion"], [["a small lesion"]])
    assert out["METEOR"] is None and out["mBMR"] is None
    assert out["BLEU-1"] == pytest.approx(1.0) and out["ROUGE-L"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="hypotheses"):
        M.caption_metrics([], [])
