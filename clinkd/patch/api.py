"""``patch_qwen2_vl`` (one model instance) and ``patch_qwen2_vl_classes`` (every model built afterwards).

Both replace methods (never weights or modules); the vision tower is not touched. An instance patch
sets instance attributes that shadow the class methods; a class patch replaces the class methods.
Both are reversible (``unpatch_qwen2_vl`` / ``unpatch_qwen2_vl_classes``) and refuse to apply twice.
The names say Qwen2-VL for history; every family of ``_compat.FAMILIES`` is served (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL), each by its own position rule and rotary layout.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

from clinkd_kernels._dispatch import MODEL_BACKENDS  # the backends every op of a patched model serves
from clinkd_kernels.attention import HEAD_DIMS

from . import _compat
from .attention import make_attention_forward, make_rotary_forward, make_text_forward
from .geometry import mrope_section, mrope_section_problem, rope_parameters, text_head_dim, vision_width
from .loss import make_lm_forward
from .positions import (
    MCGRope,
    as_mcg_rope,
    make_compute_3d_position_ids,
    make_get_rope_index,
    make_prepare_position_ids_for_generation,
)
from .vision import make_vision_attention_forward, make_vision_rotary_forward

_MARK = "_clinkd_patch"
# Rope types whose inv_freq changes during the forward (dynamic_rope_update): the kernels would not see it.
_DYNAMIC_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class PatchSettings:
    """What a patch applies: MCG-RoPE indices (None = stock), fused attention, fused loss, kernel backend."""

    mcg_rope: MCGRope | None
    attention: bool
    loss: bool
    backend: str | None
    family: str
    vision_attention: bool = False


@dataclass
class _Applied:
    """One patch: the settings and, for undoing it, (owner, attribute, previous value or _ABSENT)."""

    settings: PatchSettings
    changes: list


class _Absent:
    """Marks "no instance attribute before the patch"; a copy of it is itself, so a deep copy of a
    patched model unpatches as the original would."""

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


_ABSENT = _Absent()
_CLASS_PATCHES: dict[type, _Applied] = {}


def _settings(family, mcg_rope, attention, loss, backend, vision_attention, vision_config) -> PatchSettings:
    """The settings, with ``vision_attention=None`` resolved: on when the tower's config is served."""
    for name, value in (("attention", attention), ("loss", loss)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if vision_attention is not None and not isinstance(vision_attention, bool):
        raise TypeError(
            f"vision_attention must be a bool or None (on where the tower is served), got "
            f"{type(vision_attention).__name__}"
        )
    if backend not in MODEL_BACKENDS:
        raise ValueError(
            f"backend must be one of {MODEL_BACKENDS} (None: by device, or CLINKD_BACKEND), got {backend!r}"
        )
    if not _compat.axial_vision_rotary(family):
        if vision_attention:
            import transformers

            raise ValueError(
                f"vision_attention=True: the fused vision attention replaces the axial 2-D rotary of "
                f"transformers 5.17+, and transformers {transformers.__version__} builds the vision "
                "tower's cos/sin itself; patch with vision_attention=None or False (the stock tower)"
            )
        vision_attention = False
    elif vision_config is None:  # the class patch: no config yet; towers are served per call
        vision_attention = vision_attention is not False
    elif vision_attention is None:
        vision_attention = _vision_refusal(vision_config, family) is None
    elif vision_attention:
        _check_vision_config(vision_config, family)
    return PatchSettings(as_mcg_rope(mcg_rope), attention, loss, backend, family.name, vision_attention)


def _check_vision_config(vision_config, family) -> None:
    """ValueError when ``vision_attention=True`` asks for a tower the fused attention cannot serve."""
    refusal = _vision_refusal(vision_config, family)
    if refusal is not None:
        raise ValueError(
            f"{family.name} vision config: {refusal}; patch with vision_attention=False (or None: fused where served)"
        )


def _vision_refusal(vision_config, family) -> str | None:
    """Why the fused attention cannot serve this vision tower, or None."""
    width = vision_width(vision_config)[1] or vision_config.hidden_size
    heads = vision_config.num_heads
    head_dim = width // heads
    if head_dim not in HEAD_DIMS or head_dim % 4:
        return (
            f"head_dim {head_dim} (width {width} / num_heads {heads}) is not one the fused attention takes "
            f"({', '.join(map(str, HEAD_DIMS))}, and a multiple of 4 for the 2-D rotary)"
        )
    rope = dict(getattr(vision_config, "rope_parameters", None) or {})
    if rope.get("rope_type", "axial") != "axial":
        return f"rope_type {rope.get('rope_type')!r} is not the axial 2-D rotary"
    return None


def _cache_kw(attention_cls: type) -> str:
    params = inspect.signature(attention_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _check_text_config(text_config, family, settings: PatchSettings) -> None:
    """Errors for configs the patch cannot serve, raised before anything is changed."""
    head_dim = text_head_dim(text_config)
    rope = rope_parameters(text_config)
    section = mrope_section(text_config, default=list(family.default_section))
    problem = mrope_section_problem(section, head_dim, family.mrope_interleaved)
    if problem is not None:
        layout = "interleaved" if family.mrope_interleaved else "contiguous"
        raise ValueError(
            f"{family.name} config: rope_parameters['mrope_section']={list(section)} does not fit "
            f"head_dim {head_dim} (the config's head_dim, or hidden_size {text_config.hidden_size} / "
            f"num_attention_heads {text_config.num_attention_heads}) in {family.name}'s {layout} "
            f"frequency layout: {problem}"
        )
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in _DYNAMIC_ROPE:
        raise ValueError(
            f"{family.name} config: rope_type {rope_type!r} updates the frequencies during the forward, "
            "which clinkd.patch does not support"
        )
    if settings.attention:
        if head_dim not in HEAD_DIMS:
            raise ValueError(
                f"{family.name} config: the fused attention supports head_dim in {tuple(HEAD_DIMS)}, "
                f"this model has {head_dim}; patch with attention=False"
            )
        if getattr(text_config, "use_sliding_window", False):
            raise ValueError(
                f"{family.name} config: use_sliding_window=True is not supported by the fused attention; "
                "patch with attention=False"
            )
        if float(getattr(text_config, "attention_dropout", 0.0) or 0.0) != 0.0:
            raise ValueError(
                f"{family.name} config: attention_dropout={text_config.attention_dropout} is not "
                "supported by the fused attention (it has no dropout); set it to 0 or patch with "
                "attention=False"
            )


def check_patchable(
    config,
    *,
    mcg_rope=MCGRope(),
    attention: bool = True,
    loss: bool = True,
    backend: str | None = None,
    vision_attention: bool | None = None,
) -> PatchSettings:
    """What ``patch_qwen2_vl(model, **options)`` would refuse for a model with this config, checked on
    the config alone (no model, no weights): ``config`` is a Qwen2-VL / Qwen2.5-VL / Qwen3-VL config (or its text
    config), the keywords are ``patch_qwen2_vl``'s. Raises ValueError for a config the patch cannot serve
    (another model type, mrope sections not summing to head_dim/2, head_dim not in HEAD_DIMS with
    attention=True, sliding window, attention dropout, dynamic rope; a vision tower the fused attention
    cannot serve with vision_attention=True) or a bad option value, TypeError for an option of the wrong
    type. Returns the settings the patch would apply."""
    family = _compat.family_of_config(config)
    settings = _settings(
        family, mcg_rope, attention, loss, backend, vision_attention, getattr(config, "vision_config", None)
    )
    _check_text_config(getattr(config, "text_config", config), family, settings)
    return settings


def _replacements(family, settings: PatchSettings, previous):
    """[(class, method name, factory(call, wrapped) -> function)] for what ``settings`` turns on.
    ``previous(cls, name)`` gives the function whose signature the replacement keeps.
    Whatever ``settings`` say, where the stock callers of ``get_rope_index`` read ``mm_token_type_ids``
    (transformers 5.3+) both complete a missing one (``positions``): a patched model never decodes with
    1-D positions. Before 5.3 ``get_rope_index`` reads the placeholder ids and needs no help."""
    out = []
    if _compat.takes_token_types(family):
        out += [
            (
                family.cls("Model"),
                "compute_3d_position_ids",
                lambda call, wrapped: make_compute_3d_position_ids(
                    call, wrapped, types_decide=settings.mcg_rope is None
                ),
            ),
            (
                family.cls("ForConditionalGeneration"),
                "_prepare_position_ids_for_generation",
                make_prepare_position_ids_for_generation,
            ),
        ]
    if settings.mcg_rope is not None:
        cls = family.cls("Model")
        out.append(
            (
                cls,
                "get_rope_index",
                lambda call, wrapped: make_get_rope_index(wrapped, settings.mcg_rope, family=family),
            )
        )
    if settings.attention:
        text, rotary, attn = family.cls("TextModel"), family.cls("RotaryEmbedding"), family.cls("Attention")
        out.append((text, "forward", make_text_forward))
        out.append(
            (
                rotary,
                "forward",
                lambda call, wrapped: make_rotary_forward(
                    previous(rotary, "forward"), mrope_interleaved=family.mrope_interleaved
                ),
            )
        )
        out.append(
            (
                attn,
                "forward",
                lambda call, wrapped: make_attention_forward(
                    call, wrapped, backend=settings.backend, cache_kw=_cache_kw(attn)
                ),
            )
        )
    if settings.vision_attention:
        rotary, attn = family.vision_cls("rotary"), family.vision_cls("attention")
        out.append((rotary, "forward", lambda call, wrapped: make_vision_rotary_forward(previous(rotary, "forward"))))
        out.append(
            (
                attn,
                "forward",
                lambda call, wrapped: make_vision_attention_forward(
                    call, wrapped, rotary_cls=rotary, backend=settings.backend
                ),
            )
        )
    if settings.loss:
        out.append(
            (
                family.cls("ForConditionalGeneration"),
                "forward",
                lambda call, wrapped: make_lm_forward(
                    call, wrapped, output_class=family.output_class(), backend=settings.backend
                ),
            )
        )
    return out


# --------------------------------------------------------------------------------------------------
# instance patch


def patch_qwen2_vl(
    model: nn.Module,
    *,
    mcg_rope=MCGRope(),
    attention: bool = True,
    loss: bool = True,
    backend: str | None = None,
    vision_attention: bool | None = None,
) -> nn.Module:
    """Patch one Qwen2-VL, Qwen2.5-VL or Qwen3-VL ``*ForConditionalGeneration`` model in place; returns it.

    Args:
        model: ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or
            ``Qwen3VLForConditionalGeneration`` instance.
        mcg_rope: MCG-RoPE position indices, ``MCGRope(modality_gap, vision_stride)`` or a dict of those
            (default: the paper's gap 2, stride 1); None keeps the stock indices. Images and videos of
            every family, by its rule (Qwen2.5-VL's timed video positions, Qwen3-VL's per-frame grids).
        attention: text-decoder attention on ``mcg_rope_attention`` for training and prefill
            (decoding with a KV cache keeps the stock layer).
        loss: with labels, causal-LM cross-entropy by ``linear_kd_loss`` without [tokens × vocab] logits
            (logits only with ``return_logits=True`` or in eval mode).
        backend: kernel backend ("triton", "cpu", "torch"; None = by device / CLINKD_BACKEND).
        vision_attention: the vision tower's attention on ``mcg_rope_attention`` (packed, non-causal, the
            2-D rotary in the kernel; Qwen2.5-VL's window layers too). None (default): on where the
            tower's head_dim is served (Qwen2-VL and Qwen2.5-VL: 80, Qwen3-VL: 72), else off; True: on,
            ValueError where not served; False: the stock tower.

    Raises RuntimeError (transformers outside SUPPORTED_TRANSFORMERS, or already patched), TypeError
    (not a supported model class), ValueError (a config the kernels cannot serve: mrope sections not
    summing to head_dim/2, head_dim not in {64, 72, 80, 96, 128} with attention=True, sliding window,
    attention dropout, dynamic rope). Undo with ``unpatch_qwen2_vl(model)``.
    """
    _compat.check_transformers_version()
    family = _compat.family_of_class(type(model))
    if getattr(model, _MARK, None) is not None:
        how = "its class was patched" if _MARK not in vars(model) else "it was patched before"
        raise RuntimeError(
            f"{type(model).__name__} is already patched by clinkd ({how}); unpatch it first to change the settings"
        )
    settings = _settings(family, mcg_rope, attention, loss, backend, vision_attention, model.config.vision_config)
    _check_text_config(model.config.text_config, family, settings)

    changes = []
    for cls, name, factory in _replacements(family, settings, lambda c, n: getattr(c, n)):
        for module in model.modules():
            if isinstance(module, cls):
                previous = vars(module).get(name, _ABSENT)
                function = factory(_previous_call(module, name, previous), getattr(cls, name))
                setattr(module, name, function.__get__(module, type(module)))
                changes.append((module, name, previous))
    for module in model.modules():
        if isinstance(module, family.cls("Model")):
            module.rope_deltas = None  # computed with the previous indices
    object.__setattr__(model, _MARK, _Applied(settings, changes))
    return model


def _previous_call(module: nn.Module, name: str, previous):
    """``call(self, *args, **kwargs)`` running what ``module.name`` was before the patch, for whichever
    module it is called on: the class's function, or an instance override's function when the override
    is a bound method. So a deep copy of a patched model runs on the copy's weights (a bound method
    captured here would keep running the original's). An override that is not a method (a hook's
    partial, say) stays bound to its module, as it would without the patch."""
    if previous is _ABSENT:
        return getattr(type(module), name)
    if inspect.ismethod(previous) and previous.__self__ is module:
        return previous.__func__
    return lambda self, *args, **kwargs: previous(*args, **kwargs)


def unpatch_qwen2_vl(model: nn.Module) -> nn.Module:
    """Undo ``patch_qwen2_vl(model)``; returns the model. RuntimeError if it was not instance-patched."""
    applied = vars(model).get(_MARK)
    if applied is None:
        raise RuntimeError(f"{type(model).__name__} instance is not patched by clinkd.patch_qwen2_vl")
    for module, name, previous in reversed(applied.changes):
        if previous is _ABSENT:
            delattr(module, name)
        else:
            setattr(module, name, previous)
    for module in model.modules():
        if hasattr(module, "rope_deltas"):
            module.rope_deltas = None
    object.__delattr__(model, _MARK)
    return model


def patch_settings(model_or_class) -> PatchSettings | None:
    """The settings a model (or class) is patched with, or None."""
    applied = getattr(model_or_class, _MARK, None)
    return None if applied is None else applied.settings


# --------------------------------------------------------------------------------------------------
# class patch


def patch_qwen2_vl_classes(
    family: str = "Qwen2-VL",
    *,
    mcg_rope=MCGRope(),
    attention: bool = True,
    loss: bool = True,
    backend: str | None = None,
    vision_attention: bool | None = None,
) -> PatchSettings:
    """Patch the transformers classes of a family ("Qwen2-VL", "Qwen2.5-VL" or "Qwen3-VL"), so that every model
    created afterwards (``from_pretrained`` included) is patched; same options as ``patch_qwen2_vl``.
    Undo with ``unpatch_qwen2_vl_classes(family)``. RuntimeError if the family is already patched."""
    _compat.check_transformers_version()
    fam = _compat.family_by_name(family)
    top = fam.cls("ForConditionalGeneration")
    if top in _CLASS_PATCHES:
        raise RuntimeError(f"{top.__name__} classes are already patched by clinkd; call unpatch_qwen2_vl_classes first")
    # No model config yet: None patches the vision classes, which serve what they can per call (a tower
    # whose head_dim the kernel does not take runs its stock attention); True is checked per model built.
    settings = _settings(fam, mcg_rope, attention, loss, backend, vision_attention, None)
    changes = []
    for cls, name, factory in _replacements(fam, settings, lambda c, n: vars(c)[n]):
        original = vars(cls)[name]
        setattr(cls, name, factory(original, original))
        changes.append((cls, name, original))
    applied = _Applied(settings, changes)
    setattr(top, _MARK, applied)
    _CLASS_PATCHES[top] = applied
    _install_config_check(fam, top, settings, explicit_vision=vision_attention is True)
    return settings


def _install_config_check(family, top: type, settings: PatchSettings, explicit_vision: bool = False) -> None:
    """Config errors can only be raised when a model is built: check in ``__init__``."""
    original = vars(top)["__init__"]

    def __init__(self, config, *args, **kwargs):
        _check_text_config(config.text_config, family, settings)
        if explicit_vision:
            _check_vision_config(config.vision_config, family)
        original(self, config, *args, **kwargs)

    __init__.__wrapped__ = original
    top.__init__ = __init__
    _CLASS_PATCHES[top].changes.append((top, "__init__", original))


def unpatch_qwen2_vl_classes(family: str = "Qwen2-VL") -> None:
    """Restore the stock class methods of a family. RuntimeError if it is not class-patched."""
    fam = _compat.family_by_name(family)
    top = fam.cls("ForConditionalGeneration")
    applied = _CLASS_PATCHES.pop(top, None)
    if applied is None:
        raise RuntimeError(f"{top.__name__} classes are not patched by clinkd.patch_qwen2_vl_classes")
    for cls, name, original in reversed(applied.changes):
        setattr(cls, name, original)
    delattr(top, _MARK)


# --------------------------------------------------------------------------------------------------
# every family at once: the entry point inside other trainers


def apply_to_transformers(
    *,
    mcg_rope=MCGRope(),
    attention: bool = True,
    loss: bool = True,
    backend: str | None = None,
    vision_attention: bool | None = None,
    families: tuple[str, ...] | None = None,
) -> dict[str, PatchSettings]:
    """Patch the classes of every supported family (or of ``families``) so that any Qwen-VL model built
    afterwards, by any framework (LLaMA-Factory, TRL, PEFT, your own loop), runs on clinkd; options as
    ``patch_qwen2_vl``. Call it before the framework builds the model. Families the installed
    transformers does not have are left out; a family already patched is an error (nothing is changed).
    Returns {family name: the settings applied}; undo with ``revert_transformers()``."""
    _compat.check_transformers_version()
    names = [f.name for f in _compat.FAMILIES if f.available()] if families is None else list(families)
    chosen = [_compat.family_by_name(name) for name in names]
    patched = [f.name for f in chosen if f.cls("ForConditionalGeneration") in _CLASS_PATCHES]
    if patched:
        raise RuntimeError(
            f"{', '.join(patched)} classes are already patched by clinkd; call revert_transformers() "
            "first to change the settings"
        )
    settings = {}
    try:
        for family in chosen:
            settings[family.name] = patch_qwen2_vl_classes(
                family.name,
                mcg_rope=mcg_rope,
                attention=attention,
                loss=loss,
                backend=backend,
                vision_attention=vision_attention,
            )
    except BaseException:
        for name in settings:  # only what this call patched: earlier class patches of other families stay
            unpatch_qwen2_vl_classes(name)
        raise
    return settings


def revert_transformers() -> list[str]:
    """Undo every class patch (``apply_to_transformers`` and ``patch_qwen2_vl_classes``); returns the
    families restored. Models built while patched keep running patched methods only if they were
    instance-patched; class-patched ones run stock again."""
    restored = []
    for family in _compat.FAMILIES:
        if family.available() and family.cls("ForConditionalGeneration") in _CLASS_PATCHES:
            unpatch_qwen2_vl_classes(family.name)
            restored.append(family.name)
    return restored
