"""Tiny generated Med-GRIT-style data, an offline processor and random-weight Qwen2-VL configs (no downloads).

Images: random RGB PNGs of a few sizes; the processor resizes them into [16², 32²] pixels with
patch 4 and merge 2, so an image is 4 to 16 placeholder tokens. Models: hidden 64, 2 layers, 4
query / 2 KV heads of dim 16 (mrope_section (2, 3, 3)); other hidden sizes keep head_dim 16, vision depth 1, embed
32, patch 4, merge 2,
temporal patch 1. Patch them with ``attention=False`` (the fused attention needs head_dim >= 64).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

PATCH, MERGE, TEMPORAL = 4, 2, 1
MIN_PIXELS, MAX_PIXELS = 16 * 16, 32 * 32
ORGANS = ["liver", "left kidney", "right lung", "spleen", "lesion", "optic disc", "polyp", "nodule"]
MODALITIES = ["ct", "mr", "x", "fundus", "dermoscopy"]
SIZES = [(32, 32), (40, 24), (16, 48), (28, 36), (20, 20)]


def _box(rng) -> str:
    x1, y1 = rng.uniform(0, 0.5), rng.uniform(0, 0.5)
    x2, y2 = rng.uniform(x1 + 0.1, 1.0), rng.uniform(y1 + 0.1, 1.0)
    return f"({x1:.2f},{y1:.2f}),({x2:.2f},{y2:.2f})"


def raw_record(i: int, rng: random.Random, *, pairs_form: bool = False, task_field: bool = True) -> dict:
    """One record of task VG/ROC/RC/MIA (by i % 4), in the turn form or the [q, a] pair form."""
    modality = MODALITIES[i % len(MODALITIES)]
    organ = rng.choice(ORGANS)
    rid = f"{modality}_{i:04d}_{organ.replace(' ', '-')}"
    task = ("VG", "ROC", "RC", "MIA")[i % 4]
    box = _box(rng)
    if task == "VG":
        q, a = f"<img>{rid}.png</img> Where is the {organ}?", f"<box>{box}</box>"
    elif task == "ROC":
        q, a = f"<img>{rid}.png</img> What is in <box_start>{box}<box_end>?", organ
    elif task == "RC":
        q, a = (
            f"<img>{rid}.png</img> Describe the region <box>{box}</box>.",
            f"the {organ} appears normal in size and shape",
        )
    else:
        q, a = f"<img>{rid}.png</img> What does this {modality} image show?", f"a {modality} scan showing the {organ}"
    conv = [[q, a]] if pairs_form else [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    raw = {"id": rid, "conversations": conv}
    if task_field:
        raw["task"] = task
    return raw


def write_image(path: Path, size, rng: random.Random) -> None:
    from PIL import Image

    w, h = size
    pixels = np.random.default_rng(rng.randrange(2**31)).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_data(folder: Path, n: int = 8, *, seed: int = 0, name: str = "train.json", jsonl: bool = False) -> Path:
    """Write n records (all four tasks, both conversation forms) and their images into ``folder``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        raw = raw_record(i, rng, pairs_form=i % 3 == 2, task_field=i % 2 == 0)
        write_image(folder / f"{raw['id']}.png", SIZES[i % len(SIZES)], rng)
        records.append(raw)
    path = folder / name
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    return path


def corpus(n: int = 40, seed: int = 1) -> list[str]:
    """Texts to train the offline tokenizer on (the same templates as the records)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        raw = raw_record(i, rng)
        out += [raw["conversations"][0]["value"], raw["conversations"][1]["value"]]
    return out


_PROCESSOR = None


def processor():
    """The offline processor (built once per test session: it is not modified by tests)."""
    global _PROCESSOR
    if _PROCESSOR is None:
        from clinkd.data.offline_processor import build_offline_processor

        _PROCESSOR = build_offline_processor(
            corpus(),
            vocab_size=400,
            patch_size=PATCH,
            merge_size=MERGE,
            temporal_patch_size=TEMPORAL,
            min_pixels=MIN_PIXELS,
            max_pixels=MAX_PIXELS,
        )
    return _PROCESSOR


def collator(**kw):
    """A Qwen2VLCollator with the test processor's pad and image token ids."""
    from clinkd.data import Qwen2VLCollator, special_token_ids

    ids = special_token_ids(processor().tokenizer)
    return Qwen2VLCollator(pad_token_id=ids["pad_token_id"], image_token_id=ids["image_token_id"], **kw)


def model_config(vocab_size: int, *, hidden: int = 64, layers: int = 2) -> dict:
    """A ``Qwen2VLConfig`` dict for a random-weight model matching ``processor()``."""
    from clinkd.data.offline_processor import special_token_ids

    ids = special_token_ids(processor().tokenizer)
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        bos_token_id=None,
        num_attention_heads=hidden // 16,
        num_key_value_heads=1 if hidden // 16 % 2 else hidden // 32,
        max_position_embeddings=2048,
        pad_token_id=ids["pad_token_id"],
        eos_token_id=ids["eos_token_id"],
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
    )
    vision = dict(
        depth=1,
        embed_dim=32,
        hidden_size=hidden,
        num_heads=2,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        in_channels=3,
        mlp_ratio=2,
    )
    return dict(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
    )


def model(vocab_size: int, *, seed: int = 0, init_std: float | None = None, **kw):
    """Random weights (seeded); ``init_std`` (e.g. 0.1) re-draws the text weights wider than HF's 0.02
    so that the logits are spread, not near-uniform."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    m = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**model_config(vocab_size, **kw))).float()
    if init_std is not None:
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.dim() > 1 and "visual" not in name:
                    p.normal_(0.0, init_std)
    return m
