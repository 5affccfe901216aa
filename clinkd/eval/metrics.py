"""Med-GRIT metrics (PAPER.md §4), each written once here in plain Python.

* VG  — Recall@0.5: a prediction is a hit when the IoU of its first box with the ground-truth box
  is > 0.5. Corners may come in either order (they are sorted); a box with no area, or an answer
  with no parsable box, is a miss.
* ROC — accuracy: correct when every word of the ground-truth answer appears among the answer's words.
* RC / MIA — corpus BLEU-1..4, ROUGE-L and CIDEr(-D) following the COCO caption evaluation
  (pycocoevalcap) definitions, on ``tokenize``'s words; METEOR through pycocoevalcap's jar when
  both it and Java are present (else None = unavailable); mBMR = mean of BLEU-1..4, METEOR and
  ROUGE-L (None when METEOR is unavailable). SPICE needs model downloads and is not computed.

Scores are in [0, 1] (CIDEr in [0, 10]); reports multiply by 100 like the paper.
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter

_NUM = r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*"
_PAIR = re.compile(r"\(" + _NUM + "," + _NUM + r"\)\s*,\s*\(" + _NUM + "," + _NUM + r"\)")
_TAG = re.compile(r"<\|?[a-z_]+\|?>|</?[a-z_]+>")
_WORD = re.compile(r"[a-z0-9]+(?:[.'-][a-z0-9]+)*")


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first ``(x1,y1),(x2,y2)`` in ``text`` (tagged or not) as a normalised box with sorted corners,
    or None when there is none. Corners above 1 are read on Qwen2-VL's 0..1000 grid (divided by 1000)."""
    if not isinstance(text, str):
        return None
    match = _PAIR.search(text)
    if match is None:
        return None
    x1, y1, x2, y2 = (float(v) for v in match.groups())
    if max(x1, y1, x2, y2) > 1.0:
        x1, y1, x2, y2 = x1 / 1000.0, y1 / 1000.0, x2 / 1000.0, y2 / 1000.0
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def box_iou(a, b) -> float:
    """IoU of two (x1, y1, x2, y2) boxes with sorted corners; 0 when either has no area."""
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    if area_a <= 0 or area_b <= 0:
        return 0.0
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    return inter / (area_a + area_b - inter)


def vg_hit(prediction: str, reference: str, threshold: float = 0.5) -> bool:
    """IoU(first predicted box, reference box) > threshold; unparsable prediction → False."""
    ref = parse_box(reference)
    if ref is None:
        raise ValueError(f"reference {reference!r} holds no box")
    pred = parse_box(prediction)
    return pred is not None and box_iou(pred, ref) > threshold


def tokenize(text: str) -> list[str]:
    """Lower-case words, tags and punctuation dropped (the role of COCO's PTB tokenizer)."""
    return _WORD.findall(_TAG.sub(" ", text.lower()))


def roc_correct(prediction: str, reference: str) -> bool:
    """Every ground-truth word appears among the prediction's words."""
    words = set(tokenize(prediction))
    return all(w in words for w in tokenize(reference))


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(hyps: list[str], refs: list[list[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (COCO's: clipped n-gram counts summed over the corpus, closest reference length
    per sample for the brevity penalty, 1e-9 / 1e-15 guards against empty counts)."""
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for hyp, rs in zip(hyps, refs, strict=True):
        h = hyp.split()
        counts = _ngrams(h, n)
        best: Counter = Counter()
        for r in rs:
            for gram, c in _ngrams(r.split(), n).items():
                best[gram] = max(best[gram], c)
        for gram, c in counts.items():
            correct[len(gram) - 1] += min(c, best[gram])
        for k in range(n):
            guess[k] += max(0, len(h) - k)
        test_len += len(h)
        ref_len += min((abs(len(r.split()) - len(h)), len(r.split())) for r in rs)[1]
    out, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        out.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        out = [b * math.exp(1 - 1 / ratio) for b in out]
    return out


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hyps: list[str], refs: list[list[str]], beta: float = 1.2) -> float:
    """Mean over samples of ROUGE-L F_beta from the best LCS precision and recall over the references."""
    scores = []
    for hyp, rs in zip(hyps, refs, strict=True):
        h = hyp.split(" ")
        lcs = [_lcs(r.split(" "), h) for r in rs]
        p = max(c / len(h) for c in lcs)
        r = max(c / len(ref.split(" ")) for c, ref in zip(lcs, rs))
        scores.append((1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p and r else 0.0)
    return sum(scores) / len(scores)


def cider(hyps: list[str], refs: list[list[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D as COCO computes it: tf-idf n-gram vectors (document frequency over the references of
    this corpus), clipped cosine similarity per n, Gaussian length penalty, mean over n and refs, ×10."""
    cooked_refs = [[_ngrams(r.split(), n) for r in rs] for rs in refs]
    df: Counter = Counter()
    for rs in cooked_refs:
        df.update({gram for r in rs for gram in r})
    log_docs = math.log(float(len(refs)))

    def vec(counts):
        v = [dict() for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in counts.items():
            w = tf * (log_docs - math.log(max(1.0, df[gram])))
            v[len(gram) - 1][gram] = w
            norm[len(gram) - 1] += w * w
        length = sum(c for g, c in counts.items() if len(g) == 2)  # COCO counts bigrams here (sic)
        return v, [math.sqrt(x) for x in norm], length

    total = 0.0
    for hyp, rs in zip(hyps, cooked_refs, strict=True):
        vh, nh, lh = vec(_ngrams(hyp.split(), n))
        score = [0.0] * n
        for r in rs:
            vr, nr, lr = vec(r)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] and nr[k]:
                    val /= nh[k] * nr[k]
                score[k] += val * penalty
        total += sum(score) / n / len(rs) * 10.0
    return total / len(hyps)


def meteor_available() -> bool:
    """pycocoevalcap's METEOR jar and a ``java`` executable are both present."""
    try:
        import pycocoevalcap.meteor.meteor  # noqa: F401
    except ImportError:
        return False
    return shutil.which("java") is not None


class MeteorScorer:
    """One METEOR 1.5 process (pycocoevalcap's jar; its start-up loads the paraphrase tables, seconds),
    reused for every corpus scored until ``close()``; a context manager."""

    def __init__(self):
        from pycocoevalcap.meteor.meteor import Meteor

        self._meteor = Meteor()

    def __call__(self, hyps: list[str], refs: list[list[str]]) -> float | None:
        """Corpus METEOR; None when the process fails."""
        try:
            score, _ = self._meteor.compute_score({i: rs for i, rs in enumerate(refs)},
                                                  {i: [h] for i, h in enumerate(hyps)})
            return float(score)
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        self._meteor.meteor_p.kill()
        self._meteor.meteor_p.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def meteor(hyps: list[str], refs: list[list[str]], scorer: MeteorScorer | None = None) -> float | None:
    """Corpus METEOR 1.5 through pycocoevalcap (Java); None when unavailable or when the jar fails.
    ``scorer``: a running MeteorScorer to reuse (else one is started and stopped here)."""
    if scorer is not None:
        return scorer(hyps, refs)
    if not meteor_available():
        return None
    try:
        with MeteorScorer() as own:
            return own(hyps, refs)
    except OSError:
        return None


def caption_metrics(hyps: list[str], refs: list[list[str]], *, with_meteor: bool = True,
                    meteor_scorer: MeteorScorer | None = None) -> dict:
    """{"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "mBMR"} of raw answers against raw references
    (tokenised here). METEOR / mBMR are None when METEOR is unavailable."""
    if not hyps or len(hyps) != len(refs):
        raise ValueError(f"need as many hypotheses as reference lists (>0), got {len(hyps)} and {len(refs)}")
    h = [" ".join(tokenize(x)) for x in hyps]
    r = [[" ".join(tokenize(x)) for x in rs] for rs in refs]
    out = {f"BLEU-{k + 1}": v for k, v in enumerate(bleu(h, r))}
    out["METEOR"] = meteor(h, r, meteor_scorer) if with_meteor else None
    out["ROUGE-L"] = rouge_l(h, r)
    out["CIDEr"] = cider(h, r)
    parts = [out[f"BLEU-{k}"] for k in range(1, 5)] + [out["METEOR"], out["ROUGE-L"]]
    out["mBMR"] = None if out["METEOR"] is None else sum(parts) / len(parts)
    return out
