"""The patch of a model as a run config gives it (``models.<role>.patch``), checked into a ``PatchSpec``.

    spec = patch_spec({"mcg_rope": {"modality_gap": 2}, "attention": False}, "config.models.student.patch")
    spec.mcg_rope                              # MCGRope(modality_gap=2, vision_stride=1)
    patch_qwen2_vl(model, **spec.options())    # the keywords of patch_qwen2_vl (JSON values)

A ``PatchSpec`` is also a read-only mapping of those keywords (``spec["mcg_rope"]``, ``**spec``), so code
that took the patch as a dict of ``patch_qwen2_vl`` keywords takes the spec as it is. What the patch
refuses for a given model config (head_dim, backend names, ...) is ``check_patchable``'s to say.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from .positions import MCGRope

PATCH_KEYS = ("mcg_rope", "attention", "loss", "backend", "vision_attention")
MCG_ROPE_KEYS = ("modality_gap", "vision_stride")


@dataclass(frozen=True, eq=False)  # equality is the mapping's: the same keywords
class PatchSpec(Mapping):
    """What ``patch_qwen2_vl`` is asked to apply: ``mcg_rope`` (MCGRope, or None for the stock positions),
    fused ``attention`` and ``loss`` (bools), the kernel ``backend`` (a name, or None: by device) and the
    vision tower's fused attention ``vision_attention`` (bool, or None: where the tower is served)."""

    mcg_rope: MCGRope | None = MCGRope()
    attention: bool = True
    loss: bool = True
    backend: str | None = None
    vision_attention: bool | None = None

    def options(self) -> dict:
        """The ``patch_qwen2_vl`` keywords, JSON values (what ``clinkd_patch.json`` records)."""
        return {key: self[key] for key in PATCH_KEYS}

    def __getitem__(self, key: str):
        if key not in PATCH_KEYS:
            raise KeyError(key)
        value = getattr(self, key)
        return asdict(value) if isinstance(value, MCGRope) else value

    def __iter__(self):
        return iter(PATCH_KEYS)

    def __len__(self) -> int:
        return len(PATCH_KEYS)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _mapping(value, where: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")
    unknown = sorted(str(key) for key in value if key not in allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return value


def _mcg_rope(value, where: str) -> MCGRope | None:
    """null: stock positions; true: the defaults; a mapping of MCG_ROPE_KEYS (integers >= 1)."""
    if value is None:
        return None
    if value is True:
        return MCGRope()
    for key, item in _mapping(value, where, MCG_ROPE_KEYS).items():
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise ValueError(f"{where}.{key} must be an integer >= 1, got {_show(item)}")
    return MCGRope(**value)


def patch_spec(value, where: str) -> PatchSpec | None:
    """The patch of a run config's model: ``value`` None or false (no patch), or a mapping of PATCH_KEYS
    (absent keys: ``patch_qwen2_vl``'s defaults). ValueError, one line naming the key under ``where``
    (``config.models.student.patch``), for an unknown key or a value of the wrong kind."""
    if value is None or value is False:
        return None
    value = _mapping(value, where, PATCH_KEYS)
    for key in ("attention", "loss"):
        if key in value and not isinstance(value[key], bool):
            raise ValueError(f"{where}.{key} must be true or false, got {_show(value[key])}")
    if value.get("vision_attention") is not None and not isinstance(value["vision_attention"], bool):
        raise ValueError(f"{where}.vision_attention must be true or false, got {_show(value['vision_attention'])}")
    if value.get("backend") is not None and not isinstance(value["backend"], str):
        raise ValueError(
            f"{where}.backend must be a kernel backend name or null (by device), got {_show(value['backend'])}"
        )
    options = dict(value)
    if "mcg_rope" in options:
        options["mcg_rope"] = _mcg_rope(options["mcg_rope"], f"{where}.mcg_rope")
    return PatchSpec(**options)


__all__ = ["MCG_ROPE_KEYS", "PATCH_KEYS", "PatchSpec", "patch_spec"]
