"""The typed run configuration ``parse_config`` (``clinkd.train.config``) returns.

    RunConfig
      models: {"student": ModelSpec, "teacher": ModelSpec?}    patch: clinkd.patch.PatchSpec | None
      data: DataSpec
      stages: [KDStage | SFTStage | RCTStage, ...]             each a StageSpec
      lora: LoraSpec | None

A ``KDStage`` is its loss term: it is a ``KDSettings`` (the fields the trainer reads) with the
stage's name, training keywords, LoRA settings and teacher. Nothing here imports transformers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from clinkd.patch.spec import PatchSpec

from .curriculum import MarginCurriculum

if TYPE_CHECKING:
    from clinkd.rct.settings import RCTSettings

LOSS_FORMS = ("clinkd", "released")
DTYPES = ("float32", "bfloat16", "float16")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def loss_form_problem(form, beta: float, t2_scale: bool) -> str | None:
    """What is wrong with a KD loss form and the options beside it, or None (KDSettings and the config
    both ask this)."""
    if form not in LOSS_FORMS:
        return f"the loss form must be one of {LOSS_FORMS}, got {form!r}"
    if form == "released" and (beta not in (0, 1) or t2_scale):
        return (
            f"the released loss form has beta 1 (or 0: KD alone) and no T² scaling, got beta={beta}, "
            f"t2_scale={t2_scale}"
        )
    return None


@dataclass(frozen=True)
class KDSettings:
    """The KD term: ``topk`` pseudo-labels per token (None: dense online teacher), ``temperature``,
    ``alpha`` (KD weight), ``beta`` (CE weight), ``t2_scale``, the margin ``curriculum`` (None: every
    token from the start) and the loss ``form``:

        "clinkd"    loss = (alpha·KD + beta·CE) / (alpha + beta), KD and CE means over the tokens
        "released"  the released ClinKD trainer's total, (alpha·Σ_tokens KD + mean CE) / (1 + alpha)
                    (``clinkd.train.released``); beta 1, or 0 for its KD-alone switch; no T²
    """

    topk: int | None = 64
    temperature: float = 0.5
    alpha: float = 0.5
    beta: float = 1.0
    t2_scale: bool = False
    curriculum: MarginCurriculum | None = MarginCurriculum()
    form: str = "clinkd"

    def __post_init__(self):
        problem = loss_form_problem(self.form, self.beta, self.t2_scale)
        if problem is not None:
            raise ValueError(f"KDSettings: {problem}")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters (PEFT) on the student's text decoder: rank ``r``; the adapter's output scaled by
    ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``); ``dropout`` on the adapters' input;
    ``target_modules``: names of the decoder's linear layers, each of which gets an adapter in every
    decoder layer (the vision tower and the lm_head never get one). ``clinkd.train.lora`` applies it."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS
    rslora: bool = False

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), target_modules=list(self.target_modules))


@dataclass(frozen=True)
class ModelSpec:
    """A model: ``from_pretrained`` path/id, or ``config`` (a Qwen2VLConfig dict, random init); its
    ``dtype`` (a name of DTYPES), the ``patch`` applied to it (None: unpatched) and the ``id`` a store
    names it by."""

    from_pretrained: str | None = None
    config: dict | None = None
    dtype: str = "float32"
    patch: PatchSpec | None = None
    id: str | None = None

    @property
    def kernel_backend(self) -> str | None:
        """The kernels' ``backend=`` of the patch (None: by device)."""
        return None if self.patch is None else self.patch.backend

    def model_id(self) -> str:
        if self.id:
            return str(self.id)
        if self.from_pretrained:
            return self.from_pretrained
        import hashlib
        import json

        return "config:" + hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:16]

    def saved(self, folder: str | Path) -> ModelSpec:
        """This model as saved in ``folder`` (a stage's or round's final): loaded from there, same dtype
        and patch."""
        return ModelSpec(from_pretrained=str(folder), dtype=self.dtype, patch=self.patch)


@dataclass(frozen=True)
class DataSpec:
    """The training data: the ``train`` records file, the image ``root`` folder, ``max_length`` tokens per
    sample, ``packing`` (a batch's samples in one row) and ``pad_to_multiple_of``."""

    train: str
    root: str | None = None
    max_length: int = 2048
    packing: bool = False
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class StageSpec:
    """What every stage has: its ``name`` (its folder under output_dir), its TrainingArguments keywords
    over the run's (``training``), its LoRA settings (None: full fine-tuning) and the key that set them."""

    type: ClassVar[str]
    name: str
    training: dict = field(default_factory=dict)
    lora: LoraSpec | None = None
    lora_key: str = "config.lora"


@dataclass(frozen=True)
class SFTStage(StageSpec):
    """Cross-entropy on the training records."""

    type: ClassVar[str] = "sft"


@dataclass(frozen=True)
class KDStage(KDSettings, StageSpec):
    """Distillation from the teacher, ``store`` (its pseudo-labels cached first in ``store``, default
    output_dir/pseudo_labels, ``cache_batch_size`` samples per teacher batch, ``shard_size`` samples per
    shard) or ``online``; the KD term is the stage's KDSettings fields."""

    type: ClassVar[str] = "kd"
    teacher: str = "store"
    store: str | None = None
    cache_batch_size: int = 4
    shard_size: int = 256

    def settings(self) -> KDSettings:
        """The stage's KD term alone."""
        return KDSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(KDSettings)})


@dataclass(frozen=True)
class RCTStage(StageSpec):
    """Reflective Correction Training: rounds of correction, then training (``rct``: the round settings)."""

    type: ClassVar[str] = "rct"
    rct: RCTSettings = field(kw_only=True)


STAGES = {stage.type: stage for stage in (KDStage, SFTStage, RCTStage)}


@dataclass
class RunConfig:
    """A checked run: ``output_dir``, the ``models``, the ``data``, the ``stages`` in order, the
    ``processor`` ({"offline": options} or {"from_pretrained": path}), the run's TrainingArguments keywords
    (``training``), ``seed``, the ``preset`` it started from, config.lora, and the merged mapping
    (``source``)."""

    output_dir: str
    models: dict[str, ModelSpec]
    data: DataSpec
    stages: list[StageSpec]
    processor: dict
    training: dict
    seed: int = 42
    preset: str | None = None
    lora: LoraSpec | None = None
    source: dict = field(default_factory=dict)

    @property
    def student(self) -> ModelSpec:
        return self.models["student"]

    @property
    def teacher(self) -> ModelSpec | None:
        return self.models.get("teacher")

    def stage_args(self, stage: StageSpec) -> dict:
        """TrainingArguments keywords of a stage: run defaults, then the stage's overrides."""
        return {**self.training, **stage.training}

    def store_path(self, stage: KDStage) -> Path:
        return Path(stage.store) if stage.store else Path(self.output_dir) / "pseudo_labels"


__all__ = [
    "DTYPES",
    "DataSpec",
    "KDSettings",
    "KDStage",
    "LOSS_FORMS",
    "LORA_TARGETS",
    "LoraSpec",
    "ModelSpec",
    "RCTStage",
    "RunConfig",
    "SFTStage",
    "STAGES",
    "StageSpec",
    "loss_form_problem",
]
