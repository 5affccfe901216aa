"""Named run configurations. A preset is a (partial) config mapping; a YAML file naming it with
``preset: NAME`` (or ``clinkd train --preset NAME``) overrides any of its keys.

    register_preset("mine", lambda: {...}, "what it is for")
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from .errors import ConfigError

_PRESETS: dict[str, tuple[Callable[[], dict], str]] = {}


def register_preset(name: str, build: Callable[[], dict], description: str = "", *, replace: bool = False) -> None:
    """Add a preset: ``build()`` returns a fresh config mapping (see ``clinkd.train.config``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"preset name must be a non-empty string, got {name!r}")
    if name in _PRESETS and not replace:
        raise ValueError(f"preset {name!r} is already registered")
    _PRESETS[name] = (build, description)


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def describe_presets() -> dict[str, str]:
    return {name: _PRESETS[name][1] for name in preset_names()}


def get_preset(name: str) -> dict:
    """The config mapping of a preset; ConfigError listing the known names when unknown."""
    if name not in _PRESETS:
        if name == "demo":
            raise ConfigError(
                "the demo is not a preset but a command of its own: clinkd demo [--config FILE] [--set KEY=VALUE ...]"
            )
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(preset_names()) or '(none)'}")
    return copy.deepcopy(_PRESETS[name][0]())


def _released_recipe() -> dict:
    """The released ClinKD recipe on Qwen2-VL-7B-Instruct (docs/method.md): pseudo-label KD then SFT."""
    training = dict(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,
        learning_rate=5e-5,
        lr_scheduler_type="cosine",
        num_train_epochs=3,
        bf16=True,
        logging_steps=10,
        save_steps=500,
        save_total_limit=2,
        gradient_checkpointing=True,
        report_to="none",
    )
    return {
        "seed": 42,
        "models": {
            "student": {
                "from_pretrained": "Qwen/Qwen2-VL-7B-Instruct",
                "dtype": "bfloat16",
                "patch": {"mcg_rope": {"modality_gap": 2, "vision_stride": 1}},
            }
        },
        "data": {"max_length": 2048},
        "training": training,
        "stages": [
            {
                "name": "kd",
                "type": "kd",
                "teacher": "store",
                "topk": 64,
                "temperature": 0.5,
                "alpha": 0.5,
                "beta": 1.0,
                "curriculum": {"start_fraction": 0.5, "warmup_steps": 500},
                "training": {"num_train_epochs": 1},
            },
            {"name": "sft", "type": "sft"},
        ],
    }


def _released_recipe_with_rct() -> dict:
    """The released recipe, then RCT with SASG (the paper's third part; clinkd's defaults, docs/method.md):
    two rounds of one epoch, each checking a quarter of the training questions, 4 candidates per wrong
    answer, at a lower learning rate than SFT."""
    recipe = _released_recipe()
    recipe["stages"].append(
        {
            "name": "rct",
            "type": "rct",
            "rounds": 2,
            "every": "epoch",
            "sample": 0.25,
            "batch_size": 16,
            "max_new_tokens": 128,
            "candidates": 4,
            "temperature": 0.7,
            "top_p": 0.9,
            "similarity_threshold": 0.9,
            "iou_threshold": 0.5,
            "mode": "replace",
            "training": {"learning_rate": 1e-5},
        }
    )
    return recipe


def _released_recipe_on(model_id: str) -> Callable[[], dict]:
    """The released recipe with another student base (the same stages and settings)."""

    def build() -> dict:
        recipe = _released_recipe()
        recipe["models"]["student"]["from_pretrained"] = model_id
        return recipe

    return build


def _tiny_qwen3_vl() -> dict:
    """``tiny`` on Qwen3-VL: random-init Qwen3-VL teacher and student (interleaved M-RoPE, per-head q/k
    norms, deepstack vision features); the same processor, data and stages."""
    recipe = _tiny()
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2], mrope_interleaved=True),
    )
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        out_hidden_size=64,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )
    models = recipe["models"]
    models["student"]["config"] = {"model_type": "qwen3_vl", "text_config": text, "vision_config": vision}
    models["teacher"]["config"] = {
        "model_type": "qwen3_vl",
        "text_config": dict(text, num_hidden_layers=3),
        "vision_config": vision,
    }
    return recipe


def _tiny() -> dict:
    """Random-init tiny teacher and student with an offline processor: a CPU smoke run of the pipeline."""
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
    )
    vision = dict(
        depth=1,
        embed_dim=32,
        hidden_size=64,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        mlp_ratio=2,
    )
    return {
        "seed": 0,
        "processor": {
            "offline": {
                "vocab_size": 512,
                "patch_size": 4,
                "merge_size": 2,
                "temporal_patch_size": 2,
                "min_pixels": 16 * 16,
                "max_pixels": 32 * 32,
            }
        },
        "models": {
            "student": {
                "config": {"text_config": text, "vision_config": vision},
                "patch": {"mcg_rope": {"modality_gap": 2, "vision_stride": 1}, "attention": False},
            },
            "teacher": {"config": {"text_config": dict(text, num_hidden_layers=3), "vision_config": vision}},
        },
        "data": {"max_length": 512},
        "training": dict(
            per_device_train_batch_size=2,
            learning_rate=1e-3,
            num_train_epochs=1,
            logging_steps=1,
            save_steps=50,
            report_to="none",
            use_cpu=True,
        ),
        "stages": [
            {
                "name": "kd",
                "type": "kd",
                "teacher": "store",
                "topk": 8,
                "temperature": 1.0,
                "curriculum": {"start_fraction": 0.5, "warmup_steps": 10},
            },
            {"name": "sft", "type": "sft"},
        ],
    }


register_preset(
    "clinkd-qwen2-vl-7b",
    _released_recipe,
    "the released ClinKD recipe on Qwen2-VL-7B-Instruct: give models.teacher, data.train, output_dir",
)
register_preset(
    "clinkd-qwen2-vl-7b-rct",
    _released_recipe_with_rct,
    "the released recipe, then two rounds of Reflective Correction Training (RCT + SASG): give "
    "models.teacher, data.train, output_dir",
)
register_preset(
    "clinkd-qwen2.5-vl-7b",
    _released_recipe_on("Qwen/Qwen2.5-VL-7B-Instruct"),
    "the released recipe with a Qwen2.5-VL-7B-Instruct student: give models.teacher, data.train, output_dir",
)
register_preset(
    "clinkd-qwen3-vl-8b",
    _released_recipe_on("Qwen/Qwen3-VL-8B-Instruct"),
    "the released recipe with a Qwen3-VL-8B-Instruct student (interleaved M-RoPE): give models.teacher, "
    "data.train, output_dir",
)
register_preset(
    "tiny-qwen3-vl",
    _tiny_qwen3_vl,
    "tiny on Qwen3-VL: random-init Qwen3-VL models, a CPU smoke run; give data.train and output_dir",
)
register_preset(
    "tiny", _tiny, "random-init tiny models and an offline processor: a CPU smoke run; give data.train and output_dir"
)
