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
import inspect
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# The transformers versions the patch supports, stated here only: setup.py reads this line for the
# ``hf`` extra. Every minor release in it is run through the patch equivalence suite (docs/frameworks.md:
# the support table). Where the layouts differ, the adapters below find what the installed
# transformers has by looking at its classes, never by its version string.
# On 5.3-5.5 the stock positions of multi-frame grids are wrong (``get_vision_position_ids``, rewritten
# in 5.6) and clinkd's index keeps the rule of every other release; the equivalence suite compares with
# stock given upstream's fix there (tests/patch/stock_fix.py).
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
        raise RuntimeError(
            f"clinkd.patch supports transformers {window}, but transformers {found} is installed; "
            f"pip install 'transformers{window}'"
        )


@dataclass(frozen=True)
class Family:
    """One model family: its display name, modeling module, class-name prefix and config model_type."""

    name: str
    module: str
    prefix: str
    model_type: str
    text_prefix: str  # of the rotary embedding and the attention classes
    video: str  # "frames" | "timed" (Qwen2.5-VL) | "split" (Qwen3-VL): the table above
    mrope_interleaved: bool  # the rotary frequency layout
    default_section: tuple[int, int, int]  # mrope_section when the config does not give one
    vision_attention: str  # class names in the modeling module: the vision tower's attention
    vision_rotary: str  # and its 2-D rotary embedding

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

        # 5.23 alone returns the plain CausalLMOutputWithPast (no rope_deltas field)
        multimodal = getattr(modeling_outputs, "MultimodalCausalLMOutputWithPast", None)
        return multimodal or modeling_outputs.CausalLMOutputWithPast


FAMILIES = (
    Family(
        "Qwen2-VL",
        "transformers.models.qwen2_vl.modeling_qwen2_vl",
        "Qwen2VL",
        "qwen2_vl",
        "Qwen2VL",
        video="frames",
        mrope_interleaved=False,
        default_section=(16, 24, 24),
        vision_attention="VisionAttention",
        vision_rotary="Qwen2VLVisionRotaryEmbedding",
    ),
    Family(
        "Qwen2.5-VL",
        "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
        "Qwen2_5_VL",
        "qwen2_5_vl",
        "Qwen2_5_VL",
        video="timed",
        mrope_interleaved=False,
        default_section=(16, 24, 24),
        vision_attention="Qwen2_5_VLVisionAttention",
        vision_rotary="Qwen2_5_VLVisionRotaryEmbedding",
    ),
    Family(
        "Qwen3-VL",
        "transformers.models.qwen3_vl.modeling_qwen3_vl",
        "Qwen3VL",
        "qwen3_vl",
        "Qwen3VLText",
        video="split",
        mrope_interleaved=True,
        default_section=(24, 20, 20),
        vision_attention="Qwen3VLVisionAttention",
        vision_rotary="Qwen3VLVisionRotaryEmbedding",
    ),
)


# --------------------------------------------------------------------------------------------------
# Layout adapters: one small function per difference between transformers releases of the window.
#
#   where the 3-D positions are computed      5.0-5.1: inside <P>Model.forward and prepare_inputs_for_generation
#                                             5.2+:    <P>Model.compute_3d_position_ids (and generate()'s
#                                                      _prepare_position_ids_for_generation)
#   what get_rope_index reads                 5.0-5.2: the placeholder ids in input_ids
#                                             5.3+:    mm_token_type_ids (0 text, 1 image, 2 video)
#   the text rotary's output                  5.0-5.16: cos/sin per axis [3,B,S,D], the attention picks the
#                                                      sections (apply_multimodal_rotary_pos_emb)
#                                             5.17+:   cos/sin recomposed [B,S,D], sections on the rotary
#   get_rope_index's conventions              5.0-5.2: the segment after a video starts after its last frame;
#                                             5.0-5.1: rope_deltas over the padded length, padding at 1
#                                             5.3+:    after its largest spatial position; deltas over
#                                                      the unpadded tokens; padding at 0
#   the vision runs' positions                5.3-5.5: stock's get_vision_position_ids places every frame of a
#                                                      grid at the first (and Qwen2.5-VL 5.3-5.4 spends a
#                                                      second_per_grid_ts entry on each image, Qwen3-VL 5.3
#                                                      leaves video grids unsplit): not followed, clinkd
#                                                      positions them as 5.2 and 5.6+ do
#   Qwen2.5-VL video seconds per grid         5.0-5.17: truncated to an integer before the product
#                                             5.18+:   multiplied as given
#   the vision rotary                         5.0-5.16: a frequency table per patch, cos/sin made by the tower
#                                             5.17+:   the axial 2-D rotary module, fed (h, w) coordinates
#
# The first two decide which methods the patch wraps (positions.py); the rotary's output never matters to
# the fused path (it reads the position ids and inv_freq) and the stock path is fed the stock output.


def takes_token_types(family: Family) -> bool:
    """Whether the stock position callers read ``mm_token_type_ids`` (5.3+): then the patch completes a
    missing one from ``input_ids``. Before, ``get_rope_index`` finds the vision runs from the ids itself."""
    compute = getattr(family.cls("Model"), "compute_3d_position_ids", None)
    return compute is not None and "mm_token_type_ids" in inspect.signature(compute).parameters


def text_mrope_section(rotary) -> list[int]:
    """(s_t, s_h, s_w) of a text rotary embedding module: kept on the module (5.17+, and Qwen3-VL), or read
    by the attention from the config (before 5.17)."""
    section = getattr(rotary, "mrope_section", None)
    if section is None:
        rope = getattr(rotary.config, "rope_parameters", None) or {}
        section = rope["mrope_section"]
    return [int(s) for s in section]


@dataclass(frozen=True)
class IndexConventions:
    """What the installed transformers expects of ``get_rope_index`` besides the positions clinkd's index
    computes: the value at padding, what rope_deltas count, and the rule after a video."""

    pad_position: int = 0
    deltas_over_padded_length: bool = False  # rope_deltas = largest + 1 - S (else - unpadded tokens)
    restart_after_last_frame: bool = False  # the segment after a video starts after its last frame


def _source(function) -> str:
    try:
        return inspect.getsource(inspect.unwrap(function))
    except (OSError, TypeError):
        return ""


def index_conventions(model_cls: type) -> IndexConventions:
    """The conventions of a ``<P>Model`` class, read from its stock ``get_rope_index`` (the per-row loop of
    releases before 5.3: ``llm_pos_ids_list[-1].max() + 1``, ``position_ids = torch.ones(``) and from
    who consumes rope_deltas: 5.0-5.1's forward continues a cache at ``cache length + rope_deltas``
    (deltas over the padded length, as its index writes them); from 5.2 ``compute_3d_position_ids``
    continues at ``unpadded count + rope_deltas`` (deltas over the unpadded tokens; 5.2's own index still
    wrote padded-length deltas, clamped at 0 for Qwen2-VL, which its decoding then misplaces: the
    deltas its decoding needs are written instead)."""
    source = _source(model_cls.get_rope_index)  # unwrapped: a patched one reads as the stock one
    if "len(total_input_ids[i])" not in source:
        return IndexConventions()
    return IndexConventions(
        pad_position=1 if "position_ids = torch.ones(" in source else 0,
        deltas_over_padded_length=not hasattr(model_cls, "compute_3d_position_ids"),
        restart_after_last_frame="llm_pos_ids_list[-1].max() + 1" in source,
    )


def video_seconds_truncated(get_rope_index) -> bool:
    """Whether a stock Qwen2.5-VL ``get_rope_index`` truncates ``second_per_grid_ts`` to whole seconds before
    multiplying by ``tokens_per_second`` (``int(...)``, or a cast to the int64 frame range: releases before
    5.18), read from its source. 5.18+ multiplies the given seconds (``tokens_per_second * next(...)``)."""
    return "tokens_per_second * next(second_per_grid_ts)" not in _source(get_rope_index)


def axial_vision_rotary(family: Family) -> bool:
    """Whether the vision tower's rotary is the axial 2-D module fed (h, w) coordinates (5.17+), the form
    the fused vision attention replaces. Before, the tower builds cos/sin from a frequency table itself."""
    rotary = getattr(family.modeling(), family.vision_rotary, None)
    return rotary is not None and hasattr(rotary, "compute_axial_rope_parameters")


def supported_names() -> str:
    return ", ".join(f"{f.prefix}ForConditionalGeneration" for f in FAMILIES)


def family_of_class(cls: type) -> Family:
    """The family whose ForConditionalGeneration class ``cls`` is (or subclasses); TypeError otherwise."""
    if isinstance(cls, type):
        for family in FAMILIES:
            if issubclass(cls, family.cls("ForConditionalGeneration")):
                return family
    name = cls.__name__ if isinstance(cls, type) else type(cls).__name__
    raise TypeError(
        f"clinkd.patch supports {supported_names()}; got {name}. Pass the model with the "
        "language-model head (e.g. unwrap a PEFT model with model.get_base_model())."
    )


def family_of_config(config) -> Family:
    """The family of a model config (or of its text config) by its ``model_type``; ValueError otherwise."""
    model_type = str(getattr(config, "model_type", None))
    for family in FAMILIES:
        if model_type in (family.model_type, f"{family.model_type}_text"):
            return family
    raise ValueError(
        f"clinkd.patch supports the model types {', '.join(f.model_type for f in FAMILIES)} "
        f"({supported_names()}); got {model_type}"
    )


def family_by_name(name: str) -> Family:
    for family in FAMILIES:
        if name in (family.name, family.prefix):
            return family
    raise ValueError(f"unknown model family {name!r}; supported: {', '.join(f.name for f in FAMILIES)}")
