"""The semantic scorer: the real sentence-embedding model (installed with the rct extra), ROUGE-L when
asked for, and clear errors — never a silent fallback."""

from __future__ import annotations

import functools

import pytest
import torch

from clinkd.rct.similarity import (
    DEFAULT_MODEL,
    EmbeddingSimilarity,
    LexicalSimilarity,
    SimilarityError,
    load_similarity,
    model_folder,
)


@functools.cache
def _default():
    return load_similarity({})


def test_the_default_model_loads_offline_from_its_package(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    similarity = _default()
    assert isinstance(similarity, EmbeddingSimilarity) and similarity.name == DEFAULT_MODEL
    assert model_folder(DEFAULT_MODEL).joinpath("model.safetensors").is_file()


def test_paraphrases_score_above_unrelated_texts():
    similarity = _default()
    pairs = [
        (
            "A large liver tumor in the lower right of the CT image.",
            "The CT image shows a big tumour of the liver at the lower right.",
            "The weather in the mountains was cold and windy.",
        ),
        ("a small nodule in the left lung", "a little lesion in the left lung", "an enlarged heart"),
        ("kidney cyst", "a cyst of the kidney", "optic disc"),
    ]
    for reference, paraphrase, unrelated in pairs:
        close, far = similarity([paraphrase, unrelated], [reference, reference]).tolist()
        assert close > far + 0.2, (reference, close, far)
        assert close > 0.6 and far < 0.5
    same = similarity(["liver tumor"], ["liver tumor"])
    assert same.shape == (1,) and same.dtype == torch.float32 and same.item() == pytest.approx(1.0, abs=1e-5)


def test_scores_do_not_depend_on_the_batch():
    similarity = _default()
    texts = ["a cyst", "a tumor in the liver", "normal", "a cyst"]
    refs = ["a kidney cyst", "a liver tumour", "no finding", "a kidney cyst"]
    together = similarity(texts, refs)
    alone = torch.cat([similarity([t], [r]) for t, r in zip(texts, refs)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert together[0] == together[3]


def test_lexical_similarity_is_pycocoevalcap_rouge_l():
    from pycocoevalcap.rouge.rouge import Rouge

    lexical = LexicalSimilarity()
    texts, refs = ["a large liver tumor", "kidney", ""], ["a small liver tumor here", "kidney", ""]
    got = lexical(texts, refs)
    expected = [Rouge().calc_score(["a large liver tumor"], ["a small liver tumor here"]), 1.0, 1.0]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))
    assert lexical(["words"], [""]).item() == 0.0


def test_rouge_l_is_used_only_when_asked_and_then_named():
    assert load_similarity({"model": "rouge-l"}).name == "rouge-l"
    with pytest.raises(SimilarityError, match="neither a folder nor an installed package"):
        load_similarity({"model": "/nonexistent/embedder"})
    fallback = load_similarity({"model": "/nonexistent/embedder", "fallback": "rouge-l"})
    assert isinstance(fallback, LexicalSimilarity) and fallback.name.startswith("rouge-l (fallback: ")
    assert "/nonexistent/embedder" in fallback.name


def test_missing_models_say_what_is_missing(tmp_path):
    with pytest.raises(SimilarityError, match="no_such_embedder_package"):
        model_folder("no_such_embedder_package")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SimilarityError, match="holds no sentence-transformers model"):
        model_folder(str(tmp_path / "empty"))
    with pytest.raises(SimilarityError, match="path or an installed package"):
        model_folder("")


def test_a_saved_folder_loads_like_the_package(tmp_path):
    import shutil

    folder = tmp_path / "my-embedder"
    shutil.copytree(model_folder(DEFAULT_MODEL), folder)
    mine = load_similarity({"model": str(folder)})
    assert mine.name == str(folder)
    torch.testing.assert_close(mine(["a cyst"], ["a kidney cyst"]), _default()(["a cyst"], ["a kidney cyst"]))


def test_pairs_must_match():
    with pytest.raises(ValueError, match="same length"):
        LexicalSimilarity()(["a"], [])
