"""The sections of a run config as pydantic models: their keys, the type and range of each value.

    keys = checked(KDKeys, mapping, "config.stages[0]")    # ConfigError: one line naming the first bad key
    keys.model_fields_set                                  # the keys the mapping gave (the rest: the specs' defaults)

Every model forbids unknown keys and converts nothing (``strict``: 1 is not true, "1" is not 1; an
integer is a number). The rules between keys (exactly one of from_pretrained or config, alpha + beta > 0,
...) and those that need more than the value (paths, TrainingArguments' own keys) are
``clinkd.train.config``'s. A pydantic error becomes the message of ``ConfigError``:

    <key> must be <what is allowed>, got <value>      a value of the wrong type (a field's description,
                                                      where it has one, says what is allowed)
    <key> must be >= 1, got 0                         a value out of range
    <where>: unknown key(s) a, b; allowed: ...        keys the section does not have
    <key><message>                                    a check of a value, its ValueError's message
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WrapValidator

from ..data.records import show
from .errors import ConfigError
from .specs import DTYPES, LORA_TARGETS


def path_text(value):
    """A path string: non-empty, without NUL, encodable as a file name."""
    if not isinstance(value, str) or not value:
        raise ValueError(f" must be a path string, got {show(value)}")
    if "\0" in value:
        raise ValueError(f": the path {show(value)} holds a NUL character")
    try:
        os.fsencode(value)
    except UnicodeError:
        raise ValueError(f": the path {show(value)} holds a character file names cannot have") from None
    return value


def kd_temperature(value, handler) -> float:
    """A number (``handler``: pydantic's check of the type) in the range the kernels take."""
    from clinkd_kernels import TEMPERATURE_RANGE

    number = handler(value)
    low, high = TEMPERATURE_RANGE
    if not number >= low:
        raise ValueError(f" must be >= {low}, got {value!r}")
    if not number <= high:
        raise ValueError(f" must be <= {high}, got {value!r}")
    return number


def layer_names(names: list) -> list:
    import re

    for i, name in enumerate(names):
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"[{i}] must be the name of a linear layer (like q_proj), got {show(name)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f" names {', '.join(repeated)} more than once")
    return names


PathText = Annotated[str, BeforeValidator(path_text)]
Positive = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Weight = Annotated[float, Field(ge=0)]


class Section(BaseModel):
    """A mapping of the config: only these keys, values of exactly these types."""

    model_config = ConfigDict(extra="forbid", strict=True)

    def given(self) -> dict:
        """The keys the mapping gave, with their checked values."""
        return {key: getattr(self, key) for key in type(self).model_fields if key in self.model_fields_set}


class RunKeys(Section):
    """The top level; each section (a mapping) is checked by its own model."""

    preset: Any = None
    output_dir: Any = None
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42
    processor: Any = None
    models: Any = None
    data: Any = None
    training: Any = None
    lora: Any = None
    stages: Any = None


class ModelsKeys(Section):
    """``models``: each role a ``ModelKeys`` mapping."""

    student: Any = None
    teacher: Any = None


class ModelKeys(Section):
    """Exactly one of from_pretrained and config is given (``clinkd.train.sections.model_spec``)."""

    from_pretrained: PathText | None = None
    config: dict | None = Field(None, description="a mapping of Qwen2VLConfig fields")
    dtype: Literal[DTYPES] = Field(None, description=f"one of {', '.join(DTYPES)}")
    patch: Any = None
    id: str | None = Field(None, description="a string")


class DataKeys(Section):
    """``data``."""

    train: Any = None  # required: a path string (``clinkd.train.sections.data_spec``)
    root: PathText | None = None
    max_length: Annotated[int, Field(ge=8)] = None
    packing: bool = None
    pad_to_multiple_of: Positive | None = None


class ProcessorKeys(Section):
    """``processor``: at most one of the two (``offline`` an ``OfflineKeys`` mapping)."""

    from_pretrained: PathText = None
    offline: Any = None


class OfflineKeys(Section):
    """``processor.offline``: ``build_offline_processor``'s options."""

    vocab_size: Positive = None
    min_frequency: Annotated[int, Field(ge=0)] = None
    patch_size: Positive = None
    merge_size: Positive = None
    temporal_patch_size: Positive = None
    min_pixels: Positive = None
    max_pixels: Positive = None


class LoraKeys(Section):
    """``lora`` and ``stages[i].lora`` (``clinkd.train.specs.LoraSpec``)."""

    r: Positive = None
    alpha: Annotated[float, Field(gt=0, allow_inf_nan=False)] = None
    dropout: Annotated[float, Field(ge=0, lt=1)] = None
    target_modules: Annotated[list, Field(min_length=1), AfterValidator(layer_names)] = Field(
        None, description=f"a non-empty list of layer names (e.g. [{', '.join(LORA_TARGETS)}])"
    )
    rslora: bool = None


class StageKeys(Section):
    """What every stage has; ``type`` chooses the model of the rest (``STAGE_KEYS``)."""

    name: Any = None
    type: Any = None
    training: Any = None
    lora: Any = None


class SFTKeys(StageKeys):
    """An sft stage: nothing of its own."""


class KDKeys(StageKeys):
    """A kd stage (``clinkd.train.specs.KDStage``; ``loss_form`` is its ``form``)."""

    teacher: Literal["store", "online"] = Field(None, description="'store' or 'online'")
    store: PathText | None = None
    topk: Annotated[int, Field(ge=1, le=1024)] | None = None
    temperature: Annotated[float, WrapValidator(kd_temperature)] = None
    alpha: Weight = None
    beta: Weight = None
    t2_scale: bool = None
    loss_form: Any = None
    curriculum: Any = None
    cache_batch_size: Positive = None
    shard_size: Positive = None


class RCTKeys(StageKeys):
    """The round settings are ``clinkd.rct.RCTSettings``' to check; the thresholds and the similarity
    model are the config's."""

    rounds: Any = None
    every: Any = None
    steps: Any = None
    sample: Any = None
    batch_size: Any = None
    max_new_tokens: Any = None
    candidates: Any = None
    temperature: Any = None
    top_p: Any = None
    similarity_threshold: Fraction = None
    iou_threshold: Fraction = None
    template: Any = None
    mode: Any = None
    similarity: Any = None


class SimilarityKeys(Section):
    """An rct stage's ``similarity`` model."""

    model: PathText = None
    fallback: Literal["rouge-l"] | None = Field(None, description="rouge-l or null")
    device: str = Field(None, description="a device name (cpu, cuda)")
    batch_size: Positive = None


class CurriculumKeys(Section):
    """A kd stage's ``curriculum`` (``MarginCurriculum`` checks the values)."""

    start_fraction: Any = None
    warmup_steps: Any = None


STAGE_KEYS = {"kd": KDKeys, "sft": SFTKeys, "rct": RCTKeys}


def checked(model: type[Section], value, where: str) -> Section:
    """``value`` (a mapping; None: an empty one) checked against ``model``; ConfigError naming the key."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    try:
        return model.model_validate(value)
    except ValidationError as e:
        raise ConfigError(problem(e, where, model.model_fields)) from None


def problem(error: ValidationError, where: str, fields: dict) -> str:
    """The one-line message of the first problem pydantic found (unknown keys first). ``fields``: the
    section's fields (name → FieldInfo: their names are the allowed keys, their descriptions what a
    value may be)."""
    errors = error.errors(include_url=False)
    unknown = sorted(str(e["loc"][-1]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}"
    first = errors[0]
    loc = first["loc"]
    key = where + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    info = fields.get(loc[0]) if len(loc) == 1 else None
    return key + phrase(first, info.description if info is not None else None)


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "list_type": "a list",
    "missing": None,
}
_BOUNDS = {
    "greater_than_equal": ("ge", ">="),
    "greater_than": ("gt", ">"),
    "less_than_equal": ("le", "<="),
    "less_than": ("lt", "<"),
}


def _number(value) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def phrase(error: dict, allowed: str | None = None, *, unquote_hint: bool = False) -> str:
    """What follows the key in the message of one pydantic error; ``allowed``: what a value may be;
    ``unquote_hint``: a number written as a string is told to be written unquoted."""
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "value_error":
        return str(ctx["error"])
    if kind in _BOUNDS:
        name, sign = _BOUNDS[kind]
        return f" must be {sign} {_number(ctx[name])}, got {value!r}"
    if kind == "finite_number":
        return f" must be a finite number, got {value!r}"
    if kind == "missing":
        return " is required"
    if kind == "literal_error" and allowed is None:
        allowed = f"one of {ctx['expected']}"
    allowed = allowed or _EXPECTED.get(kind)
    if allowed is None:
        return f": {error['msg']}, got {show(value)}"
    hint = ""
    if unquote_hint and kind in ("int_type", "float_type") and isinstance(value, str):
        try:
            float(value)
            hint = " (a string: write the number unquoted, e.g. 1.0e-5)"
        except ValueError:
            pass
    return f" must be {allowed}, got {show(value)}{hint}"


__all__ = [
    "CurriculumKeys",
    "DataKeys",
    "KDKeys",
    "LoraKeys",
    "ModelKeys",
    "ModelsKeys",
    "OfflineKeys",
    "PathText",
    "ProcessorKeys",
    "RCTKeys",
    "RunKeys",
    "STAGE_KEYS",
    "SFTKeys",
    "Section",
    "SimilarityKeys",
    "StageKeys",
    "checked",
    "phrase",
    "problem",
]
