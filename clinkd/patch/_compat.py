"""What the patch needs to know about the installed transformers: the supported versions and where
each model family keeps the classes that are patched.

A family is a ``*ForConditionalGeneration`` class and its parts, all in one modeling module:

    <P>ForConditionalGeneration.forward   causal-LM loss            (loss=True)
    <P>Model.get_rope_index                3-D position ids          (mcg_rope)
    <P>TextModel.forward                   records the padding mask  (attention=True)
    <T>RotaryEmbedding.forward             hands on position ids     (attention=True)
    <T>Attention.forward                   fused attention           (attention=True)
    <V>VisionRotaryEmbedding.forward       hands on (h, w) coords    (vision_attention)
    <V>VisionAttention.forward             fused vision attention    (vision_attention)

(<T> is <P>, or <P>Text for Qwen3-VL.) What differs between the families, as transformers 5.x
computes it (its modeling files are the spec):

    family      video temporal positions                        rotary frequency layout
    Qwen2-VL    frame grid index                                contiguous sections (16, 24, 24)
    Qwen2.5-VL  index · tokens_per_second · second_per_grid_ts   contiguous sections (16, 24, 24)
    Qwen3-VL    one grid per frame, timestamp text between      interleaved sections (24, 20, 20)
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# The transformers versions the patch supports, stated here only: setup.py reads this line for the
# ``hf`` extra. Tested: 5.17 and 5.24; the classes and call conventions above are the same over that range.
SUPPORTED_TRANSFORMERS = (">=5.0", "<5.26")


def check_transformers_version(version: str | None = None) -> None:
    """Raise RuntimeError when ``version`` (default: the installed transformers) is outside
    SUPPORTED_TRANSFORMERS. Pre-releases and dev builds count as their release."""
    if version is None:
        import transformers  # the module as sys.modules holds it now (importing its Trainer replaces it)

        version = transformers.__version__
    found = Version(version)
    window = ",".join(SUPPORTED_TRANSFORMERS)
    if Version(found.base_version) not in SpecifierSet(window):
        raise RuntimeError(f"clinkd.patch supports transformers {window}, but transformers {found} is installed; "
                           f"pip install 'transformers{window}'")


@dataclass(frozen=True)
class Family:
    """One model family: its display name, modeling module, class-name prefix and config model_type."""

    name: str
    module: str
    prefix: str
    model_type: str
    text_prefix: str            # of the rotary embedding and the attention classes
    video: str                  # "frames" | "timed" (Qwen2.5-VL) | "split" (Qwen3-VL): the table above
    mrope_interleaved: bool     # the rotary frequency layout
    default_section: tuple[int, int, int]   # mrope_section when the config does not give one
    vision_attention: str       # class names in the modeling module: the vision tower's attention
    vision_rotary: str          # and its 2-D rotary embedding

    def modeling(self):
        return importlib.import_module(self.module)

    def available(self) -> bool:
        """Whether the installed transformers has this family."""
        return importlib.util.find_spec(self.module) is not None

    def cls(self, part: str) -> type:
        """part: "ForConditionalGeneration", "Model", "TextModel", "RotaryEmbedding" or "Attention"."""
        prefix = self.text_prefix if part in ("RotaryEmbedding", "Attention") else self.prefix
        return getattr(self.modeling(), f"{prefix}{part}")

    def vision_cls(self, part: str) -> type:
        """part: "attention" or "rotary"."""
        return getattr(self.modeling(), self.vision_attention if part == "attention" else self.vision_rotary)

    def output_class(self) -> type:
        """The output class the stock causal-LM forward returns (its name changed across versions)."""
        legacy = getattr(self.modeling(), f"{self.prefix}CausalLMOutputWithPast", None)
        if legacy is not None:
            return legacy
        from transformers import modeling_outputs

        return modeling_outputs.MultimodalCausalLMOutputWithPast


FAMILIES = (
    Family("Qwen2-VL", "transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VL", "qwen2_vl", "Qwen2VL",
           video="frames", mrope_interleaved=False, default_section=(16, 24, 24),
           vision_attention="VisionAttention", vision_rotary="Qwen2VLVisionRotaryEmbedding"),
    Family("Qwen2.5-VL", "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VL", "qwen2_5_vl",
           "Qwen2_5_VL", video="timed", mrope_interleaved=False, default_section=(16, 24, 24),
           vision_attention="Qwen2_5_VLVisionAttention", vision_rotary="Qwen2_5_VLVisionRotaryEmbedding"),
    Family("Qwen3-VL", "transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VL", "qwen3_vl", "Qwen3VLText",
           video="split", mrope_interleaved=True, default_section=(24, 20, 20),
           vision_attention="Qwen3VLVisionAttention", vision_rotary="Qwen3VLVisionRotaryEmbedding"),
)


def supported_names() -> str:
    return ", ".join(f"{f.prefix}ForConditionalGeneration" for f in FAMILIES)


def family_of_class(cls: type) -> Family:
    """The family whose ForConditionalGeneration class ``cls`` is (or subclasses); TypeError otherwise."""
    if isinstance(cls, type):
        for family in FAMILIES:
            if issubclass(cls, family.cls("ForConditionalGeneration")):
                return family
    name = cls.__name__ if isinstance(cls, type) else type(cls).__name__
    raise TypeError(f"clinkd.patch supports {supported_names()}; got {name}. Pass the model with the "
                    "language-model head (e.g. unwrap a PEFT model with model.get_base_model()).")


def family_of_config(config) -> Family:
    """The family of a model config (or of its text config) by its ``model_type``; ValueError otherwise."""
    model_type = str(getattr(config, "model_type", None))
    for family in FAMILIES:
        if model_type in (family.model_type, f"{family.model_type}_text"):
            return family
    raise ValueError(f"clinkd.patch supports the model types {', '.join(f.model_type for f in FAMILIES)} "
                     f"({supported_names()}); got {model_type}")


def family_by_name(name: str) -> Family:
    for family in FAMILIES:
        if name in (family.name, family.prefix):
            return family
    raise ValueError(f"unknown model family {name!r}; supported: {', '.join(f.name for f in FAMILIES)}")
