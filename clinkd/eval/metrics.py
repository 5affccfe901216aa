"""Med-GRIT metrics (docs/method.md): box and answer matching here, caption scores from pycocoevalcap.

* VG  — Recall@0.5: a prediction is a hit when the IoU of its first box with the ground-truth box
  is > 0.5. Corners may come in either order (they are sorted); a box with no area, or an answer
  with no parsable box, is a miss.
* ROC — accuracy: correct when every word of the ground-truth answer appears among the answer's words.
* RC / MIA — corpus BLEU-1..4, ROUGE-L and CIDEr(-D) computed by pycocoevalcap (the COCO caption
  evaluation the paper's numbers come from) on ``tokenize``'s words; METEOR through pycocoevalcap's
  jar when Java is present (else None = unavailable); mBMR = mean of BLEU-1..4, METEOR and ROUGE-L
  (None when METEOR is unavailable). SPICE needs model downloads and is not computed.

Scores are in [0, 1] (CIDEr in [0, 10]); reports multiply by 100 like the paper.
"""

from __future__ import annotations

import re
import shutil

_NUM = r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*"
CORNERS = re.compile(r"\(" + _NUM + "," + _NUM + r"\)\s*,\s*\(" + _NUM + "," + _NUM + r"\)")
TAGS = re.compile(r"<\|?[a-z_]+\|?>|</?[a-z_]+>")
_WORD = re.compile(r"[a-z0-9]+(?:[.'-][a-z0-9]+)*")


def _box(match: re.Match) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in match.groups())
    if max(x1, y1, x2, y2) > 1.0:
        x1, y1, x2, y2 = x1 / 1000.0, y1 / 1000.0, x2 / 1000.0, y2 / 1000.0
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def parse_boxes(text: str) -> list[tuple[float, float, float, float]]:
    """Every ``(x1,y1),(x2,y2)`` in ``text`` (tagged or not) as a normalised box with sorted corners;
    corners above 1 are read on Qwen2-VL's 0..1000 grid (divided by 1000)."""
    return [_box(match) for match in CORNERS.finditer(text)] if isinstance(text, str) else []


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first box of ``parse_boxes``, or None when there is none."""
    match = CORNERS.search(text) if isinstance(text, str) else None
    return None if match is None else _box(match)


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
    return _WORD.findall(TAGS.sub(" ", text.lower()))


def roc_correct(prediction: str, reference: str) -> bool:
    """Every ground-truth word appears among the prediction's words."""
    words = set(tokenize(prediction))
    return all(w in words for w in tokenize(reference))


def _coco_inputs(hyps: list[str], refs: list[list[str]]) -> tuple[dict, dict]:
    """pycocoevalcap's input form: {sample id: [reference, ...]} and {sample id: [hypothesis]}."""
    if len(hyps) != len(refs):
        raise ValueError(f"need as many hypotheses as reference lists, got {len(hyps)} and {len(refs)}")
    return {i: list(rs) for i, rs in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}


def bleu(hyps: list[str], refs: list[list[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (pycocoevalcap) of tokenised hypotheses against tokenised references."""
    from pycocoevalcap.bleu.bleu import Bleu

    gts, res = _coco_inputs(hyps, refs)
    scores, _ = Bleu(n).compute_score(gts, res, verbose=0)
    return [float(x) for x in scores]


def rouge_l(hyps: list[str], refs: list[list[str]]) -> float:
    """Mean ROUGE-L F_1.2 (pycocoevalcap): best LCS precision and recall over each sample's references."""
    return float(rouge_l_per_sample(hyps, refs).mean())


def rouge_l_per_sample(hyps: list[str], refs: list[list[str]]):
    """ROUGE-L F_1.2 of each sample (pycocoevalcap), a NumPy array [n]: the corpus score is their mean."""
    from pycocoevalcap.rouge.rouge import Rouge

    return Rouge().compute_score(*_coco_inputs(hyps, refs))[1]


def cider(hyps: list[str], refs: list[list[str]]) -> float:
    """CIDEr-D (pycocoevalcap): tf-idf n-gram cosine with document frequencies over this corpus' references."""
    from pycocoevalcap.cider.cider import Cider

    return float(Cider().compute_score(*_coco_inputs(hyps, refs))[0])


def meteor_available() -> bool:
    """pycocoevalcap's METEOR jar and a ``java`` executable are both present."""
    try:
        import pycocoevalcap.meteor.meteor  # noqa: F401
    except ImportError:
        return False
    return shutil.which("java") is not None


class MeteorScorer:
    """One METEOR 1.5 process (pycocoevalcap's jar; its start-up loads the paraphrase tables, seconds),
    reused for every corpus scored until ``close()``; a context manager.

    The jar scores a corpus in two steps: a SCORE request per segment returns its statistics (matches,
    lengths, chunks), then one EVAL request aggregates them into the corpus score — what
    pycocoevalcap's ``Meteor.compute_score`` sends. The statistics of a (hypothesis, references) pair
    never change, so they are kept: a bootstrap that rescores resampled corpora sends only the EVAL.

    The jar answers line by line; a failure part way through a request would leave lines unread and
    every later answer shifted. So the first failure marks the scorer broken: it returns None from
    then on (METEOR unavailable) rather than a score read from the wrong line."""

    def __init__(self):
        from pycocoevalcap.meteor.meteor import Meteor

        self._meteor = Meteor()
        self._stats: dict[tuple[str, tuple[str, ...]], str] = {}
        self._broken = False

    def _segment_stats(self, hyp: str, refs: list[str]) -> str:
        key = (hyp, tuple(refs))
        if key not in self._stats:
            stats = self._meteor._stat(hyp, list(refs))
            float(stats.split()[0])  # a statistics line starts with numbers; anything else is an error
            self._stats[key] = stats
        return self._stats[key]

    def __call__(self, hyps: list[str], refs: list[list[str]]) -> float | None:
        """Corpus METEOR; None when the process fails (then for every later call too)."""
        if len(hyps) != len(refs) or not hyps:
            raise ValueError(f"need as many hypotheses as reference lists (>0), got {len(hyps)} and {len(refs)}")
        if self._broken:
            return None
        with self._meteor.lock:
            try:
                stats = [self._segment_stats(h, rs) for h, rs in zip(hyps, refs)]
                process = self._meteor.meteor_p
                process.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
                process.stdin.flush()
                for _ in stats:  # the segment scores, then the corpus score
                    process.stdout.readline()
                return float(process.stdout.readline().strip())
            except (OSError, ValueError, IndexError):
                self._broken = True
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


def caption_metrics(
    hyps: list[str], refs: list[list[str]], *, with_meteor: bool = True, meteor_scorer: MeteorScorer | None = None
) -> dict:
    """{"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "mBMR"} of raw answers against raw references
    (tokenised here). METEOR / mBMR are None when METEOR is unavailable."""
    if not hyps or len(hyps) != len(refs):
        raise ValueError(f"need as many hypotheses as reference lists (>0), got {len(hyps)} and {len(refs)}")
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError as e:
        raise ImportError("RC/MIA caption metrics need pycocoevalcap: pip install 'clinkd[eval]'") from e
    h = [" ".join(tokenize(x)) for x in hyps]
    r = [[" ".join(tokenize(x)) for x in rs] for rs in refs]
    out = {f"BLEU-{k + 1}": v for k, v in enumerate(bleu(h, r))}
    out["METEOR"] = meteor(h, r, meteor_scorer) if with_meteor else None
    out["ROUGE-L"] = rouge_l(h, r)
    out["CIDEr"] = cider(h, r)
    out["mBMR"] = mbmr(out)
    return out


def mbmr(scores: dict) -> float | None:
    """Med-GRIT's mBMR: the mean of BLEU-1..4, METEOR and ROUGE-L (None without METEOR)."""
    if scores.get("METEOR") is None:
        return None
    parts = [scores[f"BLEU-{k}"] for k in range(1, 5)] + [scores["METEOR"], scores["ROUGE-L"]]
    return sum(parts) / len(parts)
