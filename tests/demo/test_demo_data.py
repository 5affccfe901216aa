"""The generated demo data: deterministic bytes, boxes that match the drawn lesions, loadable records."""

import json

import numpy as np
import pytest
from PIL import Image

from clinkd.cli import main
from clinkd.data.records import load_records
from clinkd.demo.data import KINDS, LATTICE, MAX_LESION_CELLS, build_demo_data, draw_sample
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


@pytest.mark.parametrize("modality", sorted(KINDS))
def test_lesions_fill_lattice_cells(modality):
    rng = np.random.default_rng(int(np.random.randint(0, 10_000)))
    for _ in range(20):
        drawn = draw_sample(rng, modality)
        cells = np.asarray(drawn.box) * LATTICE
        assert cells == pytest.approx(cells.round(), abs=1e-9)  # corners on the lattice
        w, h = cells[2] - cells[0], cells[3] - cells[1]
        assert 1 <= round(w) <= MAX_LESION_CELLS and 1 <= round(h) <= MAX_LESION_CELLS
        # the lesion covers most of its box (a rounded rectangle, not a sliver)
        assert drawn.mask.mean() > 0.8 * (w * h) / LATTICE**2


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
        ({"teacher_extra_per_modality": -1}, "teacher_extra_per_modality must be a non-negative integer"),
        ({"reflections": 1.5}, "reflections must be a fraction"),
        ({"reflections": True}, "reflections must be a fraction"),
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
    assert main(["data", "demo", "--out", str(tmp_path / "r"), "--reflections", "2", "--no-progress"]) == 2
    assert "reflections must be a fraction in [0, 1], got 2.0" in capsys.readouterr().err
    flags = ["--train-per-modality", "1", "--test-per-modality", "1", "--teacher-extra-per-modality", "2"]
    assert main(["data", "demo", "--out", str(tmp_path / "t"), *flags, "--reflections", "1", "--no-progress"]) == 0
    info = json.loads((tmp_path / "t" / "info.json").read_text())
    assert info["teacher"] == len(KINDS) * (1 + 2) * 4 * 2 and info["reflection_records"] == len(KINDS) * 4


def test_teacher_sees_more_and_reflections_are_faithful(tmp_path):
    from clinkd.rct.settings import DEFAULT_TEMPLATE

    seed = int(np.random.randint(0, 10_000))
    plain = build_demo_data(tmp_path / "plain", seed=seed, train_per_modality=2, test_per_modality=1)
    rich = build_demo_data(
        tmp_path / "rich",
        seed=seed,
        train_per_modality=2,
        test_per_modality=1,
        teacher_extra_per_modality=3,
        reflections=0.5,
    )
    read = lambda folder, name: [json.loads(x) for x in (folder / name).read_text().splitlines()]  # noqa: E731
    assert read(plain, "teacher.jsonl") == read(plain, "train.jsonl")
    train, teacher = read(rich, "train.jsonl"), read(rich, "teacher.jsonl")
    originals = [r for r in train if not r["id"].endswith("_reflect")]
    assert originals == read(plain, "train.jsonl")  # the student's images and questions do not change
    assert (rich / "test.jsonl").read_bytes() == (plain / "test.jsonl").read_bytes()
    assert teacher[: len(train)] == train and len({r["image"] for r in teacher}) == len(KINDS) * (2 + 3)
    reflected = [r for r in train if r["id"].endswith("_reflect")]
    assert 0 < len(reflected) < len(originals)
    by_id = {r["id"]: r for r in originals}
    for r in reflected:
        source = by_id[r["id"].removesuffix("_reflect")]
        question, truth = (t["value"] for t in source["conversations"])
        prompt, answer = (t["value"] for t in r["conversations"])
        assert answer == truth and r["image"] == source["image"] and r["task"] == source["task"]
        head, wrong = prompt.split("\nYour previous answer was: ")
        wrong = wrong.split("\nThe correct answer is: ")[0]
        assert head == question and wrong != truth
        assert prompt == DEFAULT_TEMPLATE.format(question=question, answer=wrong, ground_truth=truth)
    info = json.loads((rich / "info.json").read_text())
    assert info["reflection_records"] == len(reflected) and info["teacher"] == len(teacher)
    assert len(load_records(rich / "teacher.jsonl")) == len(teacher)


def test_the_demo_generates_its_design_and_uses_given_data_as_it_is(tmp_path):
    from clinkd.demo.pipeline import DATA_DESIGN, _ensure_data, data_info

    skipped = []
    mapping = {"seed": 0, "data": {"train": str(tmp_path / "new" / "train.jsonl")}}
    test = _ensure_data(mapping, skipped, progress=False)
    assert skipped == [] and data_info(test)["design"] == DATA_DESIGN
    build_demo_data(tmp_path / "given", train_per_modality=1, test_per_modality=1)
    mapping["data"]["train"] = str(tmp_path / "given" / "train.jsonl")
    test = _ensure_data(mapping, skipped, progress=False)
    assert skipped == ["data"] and data_info(test)["design"] == {"teacher_extra_per_modality": 0, "reflections": 0.0}
