"""Shared pieces of the trainer tests: a tiny data set, models, trainers and run configs."""

from __future__ import annotations

from pathlib import Path

import yaml

from clinkd.data import build_dataset
from tests.data import tiny

TEACHER_EXTRA_VOCAB = 13  # the teacher's vocabulary is larger than the student's, as the loss allows
ROOT = Path(__file__).resolve().parents[2]

# A tiny random-init Qwen2.5-VL (its vision tower has gate_proj/up_proj/down_proj layers, as the text decoder)
QWEN2_5_VL = {
    "model_type": "qwen2_5_vl",
    "text_config": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
    ),
    "vision_config": dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        out_hidden_size=64,
        window_size=16,
        fullatt_block_indexes=[0],
    ),
}


def dataset(folder: Path, n: int = 8, seed: int = 5):
    return build_dataset(tiny.make_data(folder, n, seed=seed), tiny.processor(), max_length=512)


collator = tiny.collator


def student(seed: int = 0):
    return tiny.model(len(tiny.processor().tokenizer), seed=seed)


def teacher(seed: int = 1):
    return tiny.model(
        len(tiny.processor().tokenizer) + TEACHER_EXTRA_VOCAB, seed=seed, hidden=48, layers=1, init_std=0.1
    ).eval()


def trainer(model, out: Path, data, *, steps: int = 4, batch: int = 3, **kw):
    from transformers import TrainingArguments

    from clinkd.train import ClinKDTrainer

    args = TrainingArguments(
        output_dir=str(out),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=batch,
        max_steps=steps,
        logging_steps=1,
        disable_tqdm=True,
        save_strategy="no",
        learning_rate=1e-3,
        seed=0,
    )
    return ClinKDTrainer(model=model, args=args, train_dataset=data, data_collator=collator(), **kw)


def run_config(
    folder: Path,
    data_file: Path,
    *,
    kd_steps: int = 4,
    sft_steps: int = 4,
    save_steps: int = 2,
    teacher: str = "store",
    lr: float = 2e-3,
    **extra,
) -> Path:
    """A YAML run config: tiny random-init teacher and student (attention unfused: head_dim 16), the
    test processor's settings, a KD stage with the curriculum, then SFT."""
    cfg = tiny.model_config(0)
    student_cfg = {
        "text_config": {k: v for k, v in cfg["text_config"].items() if k != "vocab_size"},
        "vision_config": cfg["vision_config"],
    }
    teacher_cfg = {
        "text_config": dict(
            student_cfg["text_config"],
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=3,
            num_key_value_heads=1,
            vocab_size=len(tiny.processor().tokenizer) + TEACHER_EXTRA_VOCAB,
        ),
        "vision_config": dict(cfg["vision_config"], hidden_size=48),
    }
    mapping = {
        "output_dir": "out",
        "seed": 7,
        "processor": {
            "offline": {
                "vocab_size": 400,
                "patch_size": tiny.PATCH,
                "merge_size": tiny.MERGE,
                "temporal_patch_size": tiny.TEMPORAL,
                "min_pixels": tiny.MIN_PIXELS,
                "max_pixels": tiny.MAX_PIXELS,
            }
        },
        "models": {
            "student": {"config": student_cfg, "patch": {"attention": False}},
            "teacher": {"config": teacher_cfg},
        },
        "data": {"train": str(data_file), "max_length": 512},
        "training": {
            "per_device_train_batch_size": 4,
            "learning_rate": lr,
            "logging_steps": 1,
            "save_steps": save_steps,
            "use_cpu": True,
            "lr_scheduler_type": "constant",
            "dataloader_num_workers": 0,
        },
        "stages": [
            {
                "name": "kd",
                "type": "kd",
                "teacher": teacher,
                "topk": 6,
                "temperature": 0.8,
                "alpha": 0.5,
                "beta": 1.0,
                "curriculum": {"start_fraction": 0.5, "warmup_steps": 2},
                "cache_batch_size": 3,
                "shard_size": 3,
                "training": {"max_steps": kd_steps},
            },
            {"name": "sft", "type": "sft", "training": {"max_steps": sft_steps}},
        ],
    }
    for key, value in extra.items():
        mapping[key] = value
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


def setup_extras() -> dict:
    """The extras of setup.py (its ``_extras()``, run without the rest of the file, which builds the extension)."""
    import ast
    import os

    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    functions = [
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("_transformers_window", "_extras")
    ]
    namespace = {"ast": ast, "os": os, "HERE": str(ROOT)}
    exec(compile(ast.Module(functions, []), "setup.py", "exec"), namespace)
    return namespace["_extras"]()
