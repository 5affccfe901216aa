"""The embedded demo, end to end on CPU: ``clinkd demo``.

    run_demo(overrides=["output_dir=runs/demo"])

Steps (each resumable through ``run_training``, unless ``resume=False``; progress bars throughout):

1. data: ``data.train`` of the config; when absent, the demo data set is generated in its folder
   (``clinkd.demo.data``), with a ``test.jsonl`` beside it.
2. teacher: the config's ``models.teacher`` (a larger random-init Qwen2-VL, stock positions) trained by
   SFT on the training data → ``OUT/teacher``. Its offline processor is shared by every later run.
3. student: ``models.student`` (small, MCG-RoPE patch) with the config's stages — KD from the
   teacher's pseudo-label store with the confidence-margin curriculum, then SFT, then RCT (rounds of
   correction with SASG, each followed by an epoch of SFT on the corrected data) → ``OUT/student``.
   Evaluated twice: after SFT (``student``) and after RCT (``student_rct``).
4. RCT's ablation: the student after SFT trained for as many more epochs, in as many segments, on the
   ground truth alone → ``OUT/student_sft`` (``student_rct`` − ``student_sft`` is what the corrections do).
5. control: the same student architecture trained by SFT alone, for as many epochs as the KD and SFT
   stages together → ``OUT/control`` (``student`` − ``control`` is what distillation does).
6. greedy predictions of every model on ``test.jsonl`` (``OUT/predictions/<model>.jsonl``), Med-GRIT
   scores (``clinkd.eval``) with 95 % intervals from a paired bootstrap over the test questions
   (``clinkd.eval.bootstrap``), then the report in ``OUT``: ``report.md`` (scores with intervals, the
   differences between the models that exceed their intervals, what each RCT round did and cost,
   wall times), ``loss_curves.png`` (every model's losses along its whole run), ``report.json`` (all of
   it, every score per modality).
   Without an rct stage in the config, steps 3 and 4 have no RCT part.
   A resumed run keeps the wall times of the steps it skips from the report of the run that did them.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import time
from pathlib import Path

TEACHER_EPOCHS = 4
# The generated data's design (build_demo_data): the teacher sees eleven times the student's images (what
# it takes a teacher of this size to learn where a lesion is within the demo's minutes), and a quarter of
# the training records also come in RCT's reflection format, so the student can answer its reflection
# prompt (docs/method.md, "The ablation experiment").
DATA_DESIGN = {"teacher_extra_per_modality": 160, "reflections": 0.25}
BOOTSTRAP_RESAMPLES = 1000
ORDER = ("teacher", "student", "student_rct", "student_sft", "control")  # the report's rows


def _vision_config(hidden: int) -> dict:
    """The demo models' vision tower: the merger's output width is the text model's hidden size."""
    return dict(
        depth=1,
        embed_dim=32,
        hidden_size=hidden,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        mlp_ratio=2,
    )


# The rotary base of the demo decoders. M-RoPE gives the temporal, height and width axes consecutive blocks
# of the frequencies θ^(-2i/d), highest first, so width gets the lowest. With d = 16 or 32 and the usual
# θ = 10⁴ the width block turns by under 0.004 rad per image-token step: the 4 × 4 image grid is the same
# position to attention and no model can learn where a lesion is. At θ = 4 the lowest frequency still
# turns by more than 0.25 rad per step, so rows and columns are told apart.
ROPE_THETA = 4.0


def _text_config(hidden: int, layers: int, heads: int, kv: int, section: list[int]) -> dict:
    """A demo text decoder of ``hidden`` width, ``heads`` query and ``kv`` key/value heads, M-RoPE ``section``."""
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        rope_parameters=dict(rope_type="default", rope_theta=ROPE_THETA, mrope_section=section),
    )


def demo_preset() -> dict:
    """The demo's run config (student KD + SFT); the teacher and control configs derive from it."""

    return {
        "seed": 0,
        "output_dir": "runs/demo",
        "processor": {
            "offline": {
                "vocab_size": 640,
                "patch_size": 4,
                "merge_size": 2,
                "temporal_patch_size": 2,
                "min_pixels": 32 * 32,
                "max_pixels": 32 * 32,
            }
        },
        "models": {
            "student": {
                "config": {"text_config": _text_config(64, 2, 4, 2, [2, 3, 3]), "vision_config": _vision_config(64)},
                "patch": {"mcg_rope": {"modality_gap": 2, "vision_stride": 1}, "attention": False},
            },
            "teacher": {
                "config": {"text_config": _text_config(128, 3, 4, 2, [4, 6, 6]), "vision_config": _vision_config(128)}
            },
        },
        "data": {"train": "demo_data/train.jsonl", "max_length": 256},
        "training": dict(
            per_device_train_batch_size=16,
            learning_rate=3e-3,
            lr_scheduler_type="cosine",
            warmup_steps=5,
            num_train_epochs=4,
            logging_steps=2,
            save_steps=1000,
            report_to="none",
            use_cpu=True,
            dataloader_num_workers=0,
        ),
        "stages": [
            {
                "name": "kd",
                "type": "kd",
                "teacher": "store",
                "topk": 16,
                "temperature": 1.0,
                "alpha": 0.5,
                "curriculum": {"start_fraction": 0.5, "warmup_steps": 30},
                "cache_batch_size": 16,
                "training": {"num_train_epochs": 3},
            },
            {"name": "sft", "type": "sft", "training": {"num_train_epochs": 3}},
            {
                "name": "rct",
                "type": "rct",
                "rounds": 2,
                "every": "epoch",
                "batch_size": 32,
                "max_new_tokens": 48,
                "candidates": 4,
                "temperature": 0.7,
                "top_p": 0.9,
                "similarity_threshold": 0.9,
                "iou_threshold": 0.5,
                # fine-tuning after SFT: a tenth of its learning rate (its ablation trains at the same)
                "training": {"learning_rate": 3.0e-4},
            },
        ],
    }


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _commit() -> str | None:
    """The git commit of the clinkd source this runs from (``-dirty`` with local changes), if it is a checkout."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _previous_timings(out: Path) -> dict:
    """The step times of the report already in ``out`` (a resumed run keeps those of the steps it skips)."""
    try:
        return dict(json.loads((out / "report.json").read_text(encoding="utf-8")).get("timings_s", {}))
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _epochs(mapping: dict, stage: dict) -> float:
    return float(stage.get("training", {}).get("num_train_epochs", mapping["training"].get("num_train_epochs", 1)))


def _rct_index(stages: list[dict]) -> int | None:
    """The position of the first rct stage of a run mapping's stages, or None."""
    return next((i for i, s in enumerate(stages) if isinstance(s, dict) and s.get("type") == "rct"), None)


def derive_configs(mapping: dict, *, teacher_data: str | None = None) -> dict[str, dict]:
    """{"teacher", "student", "student_sft" (with an rct stage), "control"} run mappings from the demo
    mapping (absolute paths). ``teacher_data``: the teacher's training file (default: the student's)."""
    from clinkd.train.config import ConfigError

    out = Path(mapping["output_dir"]).resolve()
    student = copy.deepcopy({k: v for k, v in mapping.items() if k != "preset"})
    teacher_spec = student["models"].get("teacher")
    if not isinstance(teacher_spec, dict) or "config" not in teacher_spec:
        raise ConfigError("the demo needs models.teacher.config (the teacher it trains first)")
    teacher = copy.deepcopy(student)
    teacher["output_dir"] = str(out / "teacher")
    teacher["models"] = {"student": dict(teacher_spec, patch=False)}
    teacher["seed"] = student["seed"] + 1
    if teacher_data is not None:
        teacher["data"] = dict(teacher["data"], train=str(teacher_data))
    teacher["stages"] = [{"name": "sft", "type": "sft", "training": {"num_train_epochs": TEACHER_EPOCHS}}]
    shared_processor = {"from_pretrained": str(out / "teacher" / "processor")}
    student["output_dir"] = str(out / "student")
    student["processor"] = shared_processor
    student["models"]["teacher"] = {"from_pretrained": str(out / "teacher" / "sft" / "final"), "id": "demo-teacher"}
    rct = _rct_index(student["stages"])
    before_rct = student["stages"][:rct] if rct is not None else student["stages"]
    configs = {"teacher": teacher, "student": student}
    if rct is not None:
        if rct == 0:
            raise ConfigError("the demo's rct stage needs a stage before it (the student it corrects)")
        stage = student["stages"][rct]
        rounds, every = stage.get("rounds", 2), stage.get("every", "epoch")
        segment = {"num_train_epochs": 1} if every == "epoch" else {"max_steps": stage.get("steps")}
        ablation = copy.deepcopy(student)
        ablation["output_dir"] = str(out / "student_sft")
        ablation["models"] = {
            "student": {
                "from_pretrained": str(out / "student" / before_rct[-1]["name"] / "final"),
                "patch": student["models"]["student"].get("patch", {}),
            }
        }
        ablation["stages"] = [
            {"name": f"sft-{r}", "type": "sft", "training": {**stage.get("training", {}), **segment}}
            for r in range(1, rounds + 1)
        ]
        configs["student_sft"] = ablation
    control = copy.deepcopy(student)
    control["output_dir"] = str(out / "control")
    del control["models"]["teacher"]
    control["stages"] = [
        {"name": "sft", "type": "sft", "training": {"num_train_epochs": sum(_epochs(student, s) for s in before_rct)}}
    ]
    configs["control"] = control
    return configs


def _user_config(path) -> dict:
    """The mapping of a ``--config`` YAML file, read as ``clinkd train`` reads its configs (YAML 1.2
    numbers; ConfigError naming file:line when it is missing, not UTF-8, not YAML or not a mapping)."""
    from clinkd.train.config import load_yaml, read_config_text
    from clinkd.train.errors import ConfigError

    user = load_yaml(read_config_text(path), str(path), file=True) or {}
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: a run config must be a YAML mapping")
    return user


def run_demo(
    config_path=None,
    *,
    overrides: list[str] | None = None,
    progress: bool = True,
    resume: bool = True,
    max_new_tokens: int = 48,
    batch_size: int = 20,
    resamples: int | None = None,
) -> dict:
    """Run the demo (see the module docstring); returns the report mapping (also in OUT/report.json).
    ``resume=False``: refuse an output folder whose teacher/student/control already hold stages.
    ``resamples``: bootstrap resamples of the score intervals (default BOOTSTRAP_RESAMPLES)."""
    from .report import loss_curves, write_report

    started = time.perf_counter()
    resamples = BOOTSTRAP_RESAMPLES if resamples is None else resamples
    mapping = _demo_mapping(config_path, overrides)
    out = Path(mapping["output_dir"])
    timings, load, skipped = {}, {"start": _load_average()}, []

    t = time.perf_counter()
    test = _ensure_data(mapping, skipped, progress=progress)
    timings["data"] = time.perf_counter() - t

    configs = derive_configs(mapping, teacher_data=_teacher_data(test))
    results, models = _train_all(configs, timings, skipped, resume=resume, progress=progress)
    rct = _rct_summary(results["student"])
    start = {}
    if "student_sft" in results:  # its curve continues the student's run before RCT
        start["student_sft"] = sum(
            max((int(e["step"]) for e in r["log_history"] if "step" in e), default=0)
            for r in results["student"].values()
            if "rounds" not in r
        )

    scores, intervals = _score_all(
        models,
        configs,
        mapping,
        test,
        out,
        timings,
        resamples=resamples,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    load["end"] = _load_average()
    timings["total"] = time.perf_counter() - started
    timings = {k: round(v, 1) for k, v in timings.items()}
    previous = _previous_timings(out)
    for step in skipped:
        if step in previous:
            timings[step] = previous[step]
    report = {
        "scores": scores,
        "intervals": intervals,
        "timings_s": timings,
        "skipped": skipped,
        "rct": rct,
        "load_average": load,
        "cpu_count": os.cpu_count(),
        "torch_threads": _torch_threads(),
        "machine": platform.platform(),
        "commit": _commit(),
        "config": mapping,
        "data": data_info(test),
        "loss_curves": loss_curves(results, start),
    }
    write_report(out, report)
    return report


def _demo_mapping(config_path, overrides: list[str] | None) -> dict:
    """The demo preset with the user's config and overrides on top, every key checked, paths absolute."""
    from clinkd.train.config import apply_overrides, deep_merge, parse_config

    mapping = demo_preset()
    if config_path is not None:
        mapping = deep_merge(mapping, {k: v for k, v in _user_config(config_path).items() if k != "preset"})
    mapping = apply_overrides(mapping, overrides or [])
    parse_config(copy.deepcopy(mapping))  # every key checked before anything runs
    mapping["output_dir"] = str(Path(mapping["output_dir"]).resolve())
    mapping["data"]["train"] = str(Path(mapping["data"]["train"]).resolve())
    return mapping


def _ensure_data(mapping: dict, skipped: list, *, progress: bool) -> Path:
    """Generate the data set (``DATA_DESIGN``) unless its training file exists (then "data" joins
    ``skipped`` and the folder is used as it is: ``data_info`` says what it holds); returns the test file."""
    from .data import build_demo_data

    train = Path(mapping["data"]["train"])
    if train.is_file():
        skipped.append("data")
    else:
        build_demo_data(train.parent, seed=int(mapping.get("seed", 0)), progress=progress, **DATA_DESIGN)
    return train.parent / "test.jsonl"


def data_info(test: Path) -> dict | None:
    """The generated data's info.json beside ``test`` (its seed, sizes and design), or None."""
    try:
        return json.loads((test.parent / "info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _teacher_data(test: Path) -> str | None:
    """The teacher's training file beside the demo data's test split (the student's records and more),
    or None (data generated before it existed: the teacher trains on the student's)."""
    teacher = test.parent / "teacher.jsonl"
    return str(teacher) if teacher.is_file() else None


def _train_all(configs: dict, timings: dict, skipped: list, *, resume: bool, progress: bool):
    """Train each derived run; returns ({run: run_training result}, {model name: (final folder, patch)}):
    the student is evaluated after SFT and, with RCT, after RCT."""
    from clinkd.train.config import parse_config
    from clinkd.train.run import run_training

    results, models = {}, {}
    for name in configs:
        t = time.perf_counter()
        config = parse_config(configs[name])
        if resume and all((Path(config.output_dir) / s.name / "stage.json").is_file() for s in config.stages):
            skipped.append(f"train_{name}")
        elif progress:
            print(f"[demo] training the {name} ({', '.join(s.name for s in config.stages)})", flush=True)
        results[name] = run_training(config, resume=resume, progress=progress)
        if name == "student" and "student_sft" in configs:  # evaluated after SFT and after RCT
            before = config.stages[_rct_index(configs[name]["stages"]) - 1].name
            models["student"] = (results[name][before]["final"], config.student.patch)
            models["student_rct"] = (results[name][config.stages[-1].name]["final"], config.student.patch)
        else:
            models[name] = (results[name][config.stages[-1].name]["final"], config.student.patch)
        timings[f"train_{name}"] = time.perf_counter() - t
    return results, models


def _score_all(
    models: dict,
    configs: dict,
    mapping: dict,
    test: Path,
    out: Path,
    timings: dict,
    *,
    resamples: int,
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
):
    """Predict the test set with each model, score it, and bootstrap the intervals of every score;
    returns (scores, intervals)."""
    from clinkd.data.offline_processor import load_processor
    from clinkd.eval.bootstrap import bootstrap_intervals
    from clinkd.eval.evaluate import evaluate, gather
    from clinkd.eval.metrics import MeteorScorer, meteor_available
    from clinkd.eval.predict import load_model, predict

    from .report import COLUMNS

    scores, rows = {}, {}
    t = time.perf_counter()
    meteor = None
    if meteor_available():
        try:
            meteor = MeteorScorer()  # one Java process for the three evaluations and the bootstrap
        except OSError:
            meteor = None
    timings["meteor_start"] = time.perf_counter() - t
    processor = load_processor(str(Path(configs["teacher"]["output_dir"]) / "processor"))  # shared by all three
    try:
        for name, (path, patch) in sorted(models.items(), key=lambda item: ORDER.index(item[0])):
            t = time.perf_counter()
            model = load_model(path, patch=patch)
            preds = out / "predictions" / f"{name}.jsonl"
            if progress:
                print(f"[demo] predicting with the {name}", flush=True)
            predict(
                model,
                processor,
                test,
                preds,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                max_length=int(mapping["data"].get("max_length", 2048)),
                progress=progress,
            )
            scores[name] = evaluate(preds, test, meteor_scorer=meteor)
            rows[name] = gather(preds, test)[0]
            timings[f"predict_eval_{name}"] = time.perf_counter() - t
            del model
        t = time.perf_counter()
        if progress:
            print(f"[demo] bootstrap intervals ({resamples} resamples)", flush=True)
        intervals = bootstrap_intervals(
            rows, COLUMNS, resamples=resamples, seed=int(mapping.get("seed", 0)), meteor_scorer=meteor
        )
        timings["bootstrap"] = time.perf_counter() - t
    finally:
        if meteor is not None:
            meteor.close()
    return scores, intervals


def _rct_summary(stages: dict) -> list[dict]:
    """What each RCT round of the student's run did and cost (``clinkd rct-report``'s rounds)."""
    from clinkd.rct.cli import round_report

    return [round_report(Path(r["final"]).parent) for result in stages.values() for r in result.get("rounds", ())]


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
