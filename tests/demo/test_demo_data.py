"""The generated demo data: deterministic bytes, boxes that match the drawn lesions, loadable records."""

import json

import numpy as np
import pytest
from PIL import Image

from clinkd.cli import main
from clinkd.data.records import load_records
from clinkd.demo.data import KINDS, build_demo_data, draw_sample
from clinkd.eval.metrics import parse_box


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    seed = int(np.random.randint(0, 10_000))
    a = _files(build_demo_data(tmp_path / "a", seed=seed, train_per_modality=2, test_per_modality=1))
    b = _files(build_demo_data(tmp_path / "b", seed=seed, train_per_modality=2, test_per_modality=1))
    c = _files(build_demo_data(tmp_path / "c", seed=seed + 1, train_per_modality=2, test_per_modality=1))
    assert a == b
    assert a["train.jsonl"] != c["train.jsonl"]
    assert len([k for k in a if k.endswith(".png")]) == 3 * len(KINDS)


@pytest.mark.parametrize("modality", sorted(KINDS))
def test_box_is_the_lesion_extent(modality):
    drawn = draw_sample(np.random.default_rng(int(np.random.randint(0, 10_000))), modality)
    mask = drawn.mask
    changed = (drawn.image != drawn.background).any(axis=2)
    assert (changed == mask).all()  # the lesion changes exactly its mask's pixels
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    x1, y1, x2, y2 = drawn.box
    assert x1 == pytest.approx(cols.min() / w, abs=5e-4 + 1e-9) and x2 == pytest.approx(
        (cols.max() + 1) / w, abs=5e-4 + 1e-9
    )
    assert y1 == pytest.approx(rows.min() / h, abs=5e-4 + 1e-9) and y2 == pytest.approx(
        (rows.max() + 1) / h, abs=5e-4 + 1e-9
    )
    assert drawn.label in [label for label, _ in KINDS[modality][1]]


def test_written_records_match_the_images(tmp_path):
    seed = int(np.random.randint(0, 10_000))
    out = build_demo_data(tmp_path, seed=seed, train_per_modality=1, test_per_modality=1)
    records = {r.id: r for r in load_records(out / "train.jsonl") + load_records(out / "test.jsonl")}
    assert {r.task for r in records.values()} == {"VG", "ROC", "RC", "MIA"}
    rng = np.random.default_rng(seed)  # replay the generator's draws in its order
    counter = 0
    for _split in ("train", "test"):
        for modality in KINDS:
            drawn = draw_sample(rng, modality)
            sample = f"{modality}_{counter:05d}"
            counter += 1
            vg, roc = records[f"{sample}_vg"], records[f"{sample}_roc"]
            assert np.array_equal(np.asarray(Image.open(vg.image).convert("RGB")), drawn.image)
            assert parse_box(vg.turns[0][1]) == pytest.approx(drawn.box)
            assert parse_box(roc.turns[0][0]) == pytest.approx(drawn.box) and roc.turns[0][1] == drawn.label
            assert vg.modality == modality and drawn.label in records[f"{sample}_mia"].turns[0][1]


def test_uses_pydicom_slices_when_installed(tmp_path):
    out = build_demo_data(tmp_path, train_per_modality=1, test_per_modality=1)
    try:
        import pydicom  # noqa: F401

        expected = True
    except ImportError:
        expected = False
    assert json.loads((out / "info.json").read_text())["dicom"] is expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seed": -1}, "seed"),
        ({"train_per_modality": 0}, "train_per_modality"),
        ({"test_per_modality": 1.5}, "test_per_modality"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_demo_data(tmp_path, **kwargs)


def test_cli_data_demo(tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "demo",
                "--out",
                str(tmp_path),
                "--train-per-modality",
                "1",
                "--test-per-modality",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert f"{len(KINDS) * 4} training and {len(KINDS) * 4} test records" in capsys.readouterr().out
    assert main(["data", "demo", "--out", str(tmp_path), "--seed", "-3"]) == 2
