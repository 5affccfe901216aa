"""A deterministic Med-GRIT-style demo data set: images with lesions at known boxes, and templated
questions/answers for the four tasks (VG, ROC, RC, MIA). No downloads.

    build_demo_data("demo_data", seed=0)     # → demo_data/{train.jsonl, test.jsonl, images/*.png, info.json}

Images (64×64 PNG): ``ct`` and ``mr`` start from pydicom's bundled CT and MR test slices when pydicom is
installed (randomly cropped, flipped and rotated by quarter turns; else a procedural body outline),
``x`` (chest-X-ray-like), ``fundus`` and ``dermoscopy`` are drawn procedurally. Each image gets one
lesion: a rounded rectangle covering 1–2 × 1–2 cells of a 4 × 4 lattice (the demo models' image-token
grid), blended towards the colour of its kind (every kind of a modality looks different: bright vs
dark, colour), so the label is visible. The lesion's box is the pixel extent of its mask, normalised:
x1 = first column / W, x2 = (last column + 1) / W (same for y), 3 decimals: multiples of 0.25.

Each image yields one record per task (id ``<modality>_<nnnnn>_<task>``), so the answers are exact:
VG asks for the lesion's box, ROC names the lesion in a given box, RC describes the boxed region, MIA
describes the image. Same seed → the same bytes in every file.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clinkd.io import write_text_atomic

SIZE = 64
# modality → (long name, ((label, rgb target), ...)): a lesion is blended 80% towards its target colour.
KINDS = {
    "ct": ("CT", (("liver tumor", (235, 235, 235)), ("kidney cyst", (15, 15, 15)))),
    "mr": ("MRI", (("brain tumor", (240, 240, 240)), ("edema", (20, 20, 20)))),
    "x": ("X-ray", (("lung nodule", (245, 245, 245)), ("pneumothorax", (5, 5, 5)))),
    "fundus": ("fundus", (("exudate", (250, 240, 90)), ("hemorrhage", (90, 0, 0)))),
    "dermoscopy": ("dermoscopy", (("melanoma", (40, 20, 15)), ("nevus", (150, 80, 40)))),
}
ALPHA = 0.8
# Lesions sit on a LATTICE × LATTICE grid of cells, the demo models' grid of image tokens (a 64-pixel image
# is resized to 32 pixels, 8 pixels a token after the 2 × 2 merge): a lesion fills whole tokens and its
# box corners are multiples of 1 / LATTICE, so a model that finds the tokens that hold it can name the
# box exactly. Lesions of arbitrary extent ask for sub-token precision no demo-sized model reaches.
LATTICE = 4
MAX_LESION_CELLS = 2


@dataclass
class DrawnSample:
    """One image: ``image`` (H, W, 3) uint8 with the lesion, ``background`` without it, ``mask`` (H, W) bool,
    ``label``, and ``box`` (x1, y1, x2, y2) normalised from the mask's extent."""

    image: np.ndarray
    background: np.ndarray
    mask: np.ndarray
    label: str
    box: tuple[float, float, float, float]


@functools.cache
def _dicom_slice(name: str) -> np.ndarray | None:
    """pydicom's bundled slice ``name`` scaled to [0, 1] (read-only: it is read once and shared)."""
    try:
        import pydicom
        from pydicom.data import get_testdata_file
    except ImportError:
        return None
    path = get_testdata_file(name, download=False)
    if path is None:
        return None
    pixels = pydicom.dcmread(path).pixel_array.astype(np.float64)
    scaled = (pixels - pixels.min()) / max(1e-9, pixels.max() - pixels.min())
    scaled.setflags(write=False)
    return scaled


_DICOM = {"ct": "CT_small.dcm", "mr": "MR_small.dcm"}


def dicom_available() -> bool:
    """pydicom and its bundled CT and MR slices are present (else ct/mr images are procedural)."""
    return all(_dicom_slice(name) is not None for name in _DICOM.values())


def _resize(gray: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray((gray * 255).round().astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0


def _grid(size: int):
    y, x = np.mgrid[0:size, 0:size]
    return (x + 0.5) / size, (y + 0.5) / size


def _background(rng: np.random.Generator, modality: str) -> np.ndarray:
    """(SIZE, SIZE, 3) float in [0, 1] with every channel kept inside [0.12, 0.8] so that lesions, which
    move each pixel towards a target colour outside that range in some channel, always change it."""
    x, y = _grid(SIZE)
    if modality in _DICOM:
        base = _dicom_slice(_DICOM[modality])
        if base is not None:
            h = base.shape[0]
            crop = int(rng.integers(h * 3 // 4, h + 1))
            top, left = (int(rng.integers(0, h - crop + 1)) for _ in range(2))
            gray = np.rot90(base[top : top + crop, left : left + crop], int(rng.integers(4)))
            gray = _resize(gray[:, ::-1] if rng.random() < 0.5 else gray, SIZE)
        else:
            body = ((x - 0.5) / 0.42) ** 2 + ((y - 0.5) / 0.36) ** 2 < 1
            gray = 0.15 + 0.45 * body + 0.1 * np.sin(9 * x + rng.random() * 6) * body
        rgb = np.repeat(gray[..., None], 3, axis=2)
    elif modality == "x":
        lungs = sum((((x - cx) / 0.17) ** 2 + ((y - 0.5) / 0.33) ** 2 < 1) for cx in (0.3, 0.7))
        ribs = 0.06 * (np.sin(y * 40 + rng.random() * 6) > 0.6)
        gray = 0.75 - 0.45 * lungs + ribs + 0.05 * rng.random((SIZE, SIZE))
        rgb = np.repeat(gray[..., None], 3, axis=2)
    elif modality == "fundus":
        r = np.hypot(x - 0.5, y - 0.5)
        disc = np.hypot(x - rng.uniform(0.25, 0.75), y - rng.uniform(0.3, 0.7)) < 0.08
        vessels = np.abs(np.sin((x + rng.random()) * 11) - (y - 0.5) * 3) < 0.12
        rgb = np.stack([0.7 - 0.3 * r + 0.1 * disc, 0.3 + 0.3 * disc - 0.1 * vessels, 0.2 + 0.1 * disc], axis=2)
        rgb = np.where((r < 0.5)[..., None], rgb, 0.12)
    else:  # dermoscopy: skin with hair strokes
        hair = np.abs(np.sin(x * 23 + y * 7 + rng.random() * 6)) < 0.05
        tone = rng.uniform(0.7, 0.8)
        rgb = np.stack([tone - 0.2 * hair, tone - 0.15 - 0.2 * hair, tone - 0.3 - 0.1 * hair], axis=2)
        rgb = rgb + 0.03 * rng.random((SIZE, SIZE, 1))
    return np.clip(rgb, 0.12, 0.8)


def draw_sample(rng: np.random.Generator, modality: str) -> DrawnSample:
    """One image of ``modality`` with one lesion: a rounded rectangle (the super-ellipse |x/rx|⁴ + |y/ry|⁴
    < 1) filling 1 or 2 by 1 or 2 cells of the LATTICE × LATTICE grid (see the module docstring)."""
    bg = (_background(rng, modality) * 255).round().astype(np.uint8)
    label, target = KINDS[modality][1][int(rng.integers(len(KINDS[modality][1])))]
    x, y = _grid(SIZE)
    w, h = (int(rng.integers(1, MAX_LESION_CELLS + 1)) for _ in range(2))
    left, top = int(rng.integers(0, LATTICE - w + 1)), int(rng.integers(0, LATTICE - h + 1))
    cx, cy, rx, ry = (left + w / 2) / LATTICE, (top + h / 2) / LATTICE, w / (2 * LATTICE), h / (2 * LATTICE)
    mask = ((x - cx) / rx) ** 4 + ((y - cy) / ry) ** 4 < 1
    lesion = (1 - ALPHA) * bg + ALPHA * np.asarray(target, dtype=np.float64)
    image = np.where(mask[..., None], lesion.round().astype(np.uint8), bg)
    rows, cols = np.nonzero(mask)
    box = (
        round(cols.min() / SIZE, 3),
        round(rows.min() / SIZE, 3),
        round((cols.max() + 1) / SIZE, 3),
        round((rows.max() + 1) / SIZE, 3),
    )
    return DrawnSample(image, bg, mask, label, box)


def _where(box) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    vertical = "upper" if cy < 0.4 else "lower" if cy > 0.6 else "middle"
    horizontal = "left" if cx < 0.4 else "right" if cx > 0.6 else "center"
    return "center" if (vertical, horizontal) == ("middle", "center") else f"{vertical} {horizontal}"


def _size(box) -> str:
    area = (box[2] - box[0]) * (box[3] - box[1])  # 1, 2 or 4 lattice cells of 1/16 each
    return "small" if area < 0.1 else "large" if area > 0.2 else "medium"


def _box_text(box) -> str:
    return "<box>({:.3f},{:.3f}),({:.3f},{:.3f})</box>".format(*box)


def sample_records(sample_id: str, modality: str, drawn: DrawnSample, image: str) -> list[dict]:
    """The four records (VG, ROC, RC, MIA) about one drawn image."""
    name, label, box = KINDS[modality][0], drawn.label, drawn.box
    where, size = _where(box), _size(box)
    qa = {
        "VG": (f"Where is the {label} in this image?", _box_text(box)),
        "ROC": (f"What is the object in {_box_text(box)}?", label),
        "RC": (f"Describe the region {_box_text(box)}.", f"A {size} {label} in the {where} of the {name} image."),
        "MIA": ("Describe this image.", f"This {name} image shows a {size} {label} in the {where} region."),
    }
    out = []
    for task, (question, answer) in qa.items():
        out.append(
            {
                "id": f"{sample_id}_{task.lower()}",
                "task": task,
                "image": image,
                "conversations": [
                    {"from": "human", "value": f"<img>{image}</img> {question}"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    return out


def _wrong_answer(rng: np.random.Generator, modality: str, drawn: DrawnSample, task: str) -> str:
    """A plausible wrong answer to ``task`` about ``drawn``: another box, the modality's other label, or
    the description with another size, place or label (what an undertrained model answers)."""

    def answer(sample: DrawnSample) -> str:
        records = sample_records("x", modality, sample, "x.png")
        return next(r["conversations"][1]["value"] for r in records if r["task"] == task)

    truth = answer(drawn)
    while (wrong := answer(draw_sample(rng, modality))) == truth:
        pass
    return wrong


def reflection_record(rng: np.random.Generator, record: dict, modality: str, drawn: DrawnSample) -> dict:
    """A reflection-format training record (id ``<record id>_reflect``): the question of ``record`` in
    RCT's default reflection template with a wrong answer and the ground truth, answered by the ground
    truth. A student trained on a few of these can answer RCT's reflection prompt faithfully."""
    from clinkd.rct.settings import DEFAULT_TEMPLATE

    question, truth = (turn["value"] for turn in record["conversations"])
    prompt = DEFAULT_TEMPLATE.format(
        question=question, answer=_wrong_answer(rng, modality, drawn, record["task"]), ground_truth=truth
    )
    return dict(
        record,
        id=record["id"] + "_reflect",
        conversations=[{"from": "human", "value": prompt}, {"from": "gpt", "value": truth}],
    )


def build_demo_data(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    train_per_modality: int = 16,
    test_per_modality: int = 5,
    teacher_extra_per_modality: int = 0,
    reflections: float = 0.0,
    progress: bool = False,
) -> Path:
    """Write the demo data set to ``out`` (created): train.jsonl (the student's), teacher.jsonl (the
    student's records and those of ``teacher_extra_per_modality`` more images per modality: the teacher
    knows more than the student sees), test.jsonl (one record per line), images/<modality>_<nnnnn>.png
    and info.json; train.jsonl is written last. ``reflections``: the fraction of training records that
    also appear in reflection format (``reflection_record``), in both training files. Returns the folder."""
    from PIL import Image

    for name, value in (
        ("train_per_modality", train_per_modality),
        ("test_per_modality", test_per_modality),
        ("teacher_extra_per_modality", teacher_extra_per_modality + 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            shown = value - 1 if name == "teacher_extra_per_modality" else value
            low = "a non-negative" if name == "teacher_extra_per_modality" else "a positive"
            raise ValueError(f"{name} must be {low} integer, got {shown!r}")
    if isinstance(reflections, bool) or not isinstance(reflections, (int, float)) or not 0 <= reflections <= 1:
        raise ValueError(f"reflections must be a fraction in [0, 1], got {reflections!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    reflecting = np.random.default_rng([seed, 1])  # its own stream: the images are the same with or without
    splits = {"train": [], "extra": [], "test": []}
    jobs = [
        (split, modality)
        for split, count in (
            ("train", train_per_modality),
            ("test", test_per_modality),
            ("extra", teacher_extra_per_modality),
        )
        for modality in KINDS
        for _ in range(count)
    ]
    bar = _progress(len(jobs), "demo images", progress)
    for counter, (split, modality) in enumerate(jobs):
        drawn = draw_sample(rng, modality)
        sample_id = f"{modality}_{counter:05d}"
        image = f"images/{sample_id}.png"
        Image.fromarray(drawn.image).save(out / image, format="PNG", optimize=False)
        records = sample_records(sample_id, modality, drawn, image)
        if split != "test" and reflections > 0:
            chosen = [r for r in records if reflecting.random() < reflections]
            records += [reflection_record(reflecting, r, modality, drawn) for r in chosen]
        splits[split] += records
        bar.update(1)
    bar.close()
    splits["teacher"] = splits["train"] + splits.pop("extra")
    info = {
        "seed": seed,
        "size": SIZE,
        "modalities": sorted(KINDS),
        "train": len(splits["train"]),
        "teacher": len(splits["teacher"]),
        "test": len(splits["test"]),
        "reflection_records": sum(r["id"].endswith("_reflect") for r in splits["train"]),
        "design": {"teacher_extra_per_modality": teacher_extra_per_modality, "reflections": reflections},
        "dicom": dicom_available(),
    }
    write_text_atomic(out / "info.json", json.dumps(info, indent=1, sort_keys=True) + "\n")
    # train.jsonl last, atomically: its presence is what says the folder is complete (the demo pipeline
    # rebuilds everything when it is absent, so an interrupted build never leaves a half data set).
    for split in ("test", "teacher", "train"):
        write_text_atomic(out / f"{split}.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in splits[split]))
    return out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled)
