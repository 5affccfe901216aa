"""The patch a saved model was trained with, recorded beside its weights (``clinkd_patch.json``).

    write_patch_record("run/sft/final", {"mcg_rope": {"modality_gap": 2}})   # clinkd train does this
    read_patch_record("run/sft/final")      # {"patch": {...}}; {} when nothing is recorded
    patch_positions({"mcg_rope": {...}})    # "MCG-RoPE gap 2, stride 1" (or "stock")

``clinkd predict`` and ``clinkd.eval.load_model`` apply the recorded patch, so a model answers with the
position indices it was trained on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from clinkd.io import write_bytes_atomic

PATCH_RECORD = "clinkd_patch.json"


def write_patch_record(folder: str | os.PathLike, patch: dict | None) -> None:
    """Record beside saved weights the ``patch_qwen2_vl`` keywords they were trained with (None: unpatched)."""
    write_bytes_atomic(Path(folder) / PATCH_RECORD, json.dumps({"patch": patch}, indent=1).encode())


def read_patch_record(folder: str | os.PathLike) -> dict:
    """{"patch": dict | None} as ``write_patch_record`` wrote it, or {} when the folder records nothing.
    ValueError for a record that is not that JSON."""
    path = Path(folder) / PATCH_RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(record, dict) or "patch" not in record or not isinstance(record["patch"], (dict, type(None))):
        raise ValueError(f'{path} must hold {{"patch": {{...}} or null}}, got {str(record)[:80]}')
    return record


def patch_positions(patch: dict | None) -> str:
    """The position indices a patch gives: "stock", or "MCG-RoPE gap λ, stride α" (λ = α = 1 is stock)."""
    from clinkd.patch.positions import MCGRope, as_mcg_rope

    rope = None if patch is None else as_mcg_rope(patch.get("mcg_rope", MCGRope()))
    if rope is None or (rope.modality_gap, rope.vision_stride) == (1, 1):
        return "stock"
    return f"MCG-RoPE gap {rope.modality_gap}, stride {rope.vision_stride}"
