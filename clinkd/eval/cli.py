"""``clinkd data demo``, ``clinkd predict`` and ``clinkd eval`` (see ``clinkd.cli``).

clinkd data demo --out DIR [--seed 0] [--train-per-modality 16] [--test-per-modality 5]
clinkd predict --model FOLDER --data test.jsonl --out preds.jsonl [--processor FOLDER]
               [--patch '{"mcg_rope": {"modality_gap": 2}, "attention": false}'] [--batch-size 8]
               [--max-new-tokens 64] [--dtype float32] [--device cpu]
clinkd eval --pred preds.jsonl [--data test.jsonl] [--root DIR] [--json report.json] [--no-meteor]
"""

from __future__ import annotations

import argparse
import json
import sys

from clinkd.cli_paths import input_folder, output_file, output_folder

# Argument types: a bad value is argparse's one-line error (exit 2) before the command starts.


def _integer(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _device(text: str) -> str:
    """A torch device string this machine has (cpu, cuda, cuda:N, mps)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:N, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text!r}: no MPS device is available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: clinkd predict runs on cpu, cuda or mps")
    return text


def data_arguments(parser):
    sub = parser.add_subparsers(dest="action", required=True)
    demo = sub.add_parser("demo", help="write the generated demo data set (deterministic per seed)")
    demo.add_argument(
        "--out", required=True, type=output_folder, help="folder to write train.jsonl, test.jsonl, images/ into"
    )
    demo.add_argument("--seed", type=_integer(0), default=0)
    demo.add_argument(
        "--train-per-modality", type=_integer(1), default=16, help="training images per modality (×4 tasks)"
    )
    demo.add_argument("--test-per-modality", type=_integer(1), default=5, help="test images per modality (×4 tasks)")
    demo.add_argument(
        "--teacher-extra-per-modality",
        type=_integer(0),
        default=0,
        help="more images per modality in teacher.jsonl only (the teacher knows more than the student)",
    )
    demo.add_argument(
        "--reflections",
        type=float,
        default=0.0,
        help="fraction of training records also written in RCT's reflection format (0 to 1)",
    )
    demo.add_argument("--no-progress", dest="progress", action="store_false")


def data_command(args) -> int:
    from clinkd.data.records import DataError
    from clinkd.demo.data import build_demo_data

    try:
        out = build_demo_data(
            args.out,
            seed=args.seed,
            train_per_modality=args.train_per_modality,
            test_per_modality=args.test_per_modality,
            teacher_extra_per_modality=args.teacher_extra_per_modality,
            reflections=args.reflections,
            progress=args.progress,
        )
    except ValueError as e:
        raise DataError(str(e)) from None
    info = json.loads((out / "info.json").read_text())
    print(
        f"{out}: {info['train']} training and {info['test']} test records "
        f"({'with' if info['dicom'] else 'without'} pydicom's CT/MR slices)"
    )
    return 0


def predict_arguments(parser):
    parser.add_argument(
        "--model",
        required=True,
        type=input_folder,
        help="a saved model folder: "
        "OUTPUT_DIR/<stage>/final of clinkd train (the demo's: runs/demo/{teacher,student,control}/"
        "<stage>/final)",
    )
    parser.add_argument("--data", required=True, help="Med-GRIT records (.json or .jsonl)")
    parser.add_argument("--root", help="image folder (default: the data file's folder)")
    parser.add_argument("--out", required=True, type=output_file, help="predictions JSONL to write")
    parser.add_argument("--processor", type=input_folder, help="processor folder (default: the model folder)")
    parser.add_argument(
        "--patch",
        help='JSON keyword arguments of patch_qwen2_vl (e.g. \'{"mcg_rope": '
        '{"modality_gap": 2}, "attention": false}\', or null for none); default: the patch '
        "clinkd train recorded in the model folder (clinkd_patch.json), else none",
    )
    parser.add_argument("--batch-size", type=_integer(1), default=8)
    parser.add_argument("--max-new-tokens", type=_integer(1), default=64)
    parser.add_argument("--max-length", type=_integer(8), default=2048)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu", type=_device)
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def predict_command(args) -> int:
    from clinkd.data.offline_processor import load_processor
    from clinkd.data.records import DataError, load_records
    from clinkd.eval.predict import SAVED, load_model, predict

    try:
        patch = json.loads(args.patch) if args.patch is not None else SAVED
    except json.JSONDecodeError as e:
        raise DataError(f"--patch is not valid JSON ({e.msg})") from None
    if patch is not None and patch is not SAVED and not isinstance(patch, dict):
        raise DataError("--patch must be a JSON object of patch_qwen2_vl keyword arguments, or null")
    load_records(args.data, root=args.root, check_images=True)  # bad data fails before the model loads
    try:  # a folder without a model or processor, a patch the model refuses: user errors
        processor = load_processor(args.processor or args.model)
        model = load_model(args.model, patch=patch, dtype=args.dtype, device=args.device)
    except (ValueError, TypeError, OSError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(str(e)) from None
    n = predict(
        model,
        processor,
        args.data,
        args.out,
        root=args.root,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
        progress=args.progress,
    )
    print(f"{args.out}: {n} predictions")
    return 0


def eval_arguments(parser):
    parser.add_argument("--pred", required=True, help="predictions JSONL (clinkd predict writes it)")
    parser.add_argument("--data", help="ground-truth records; without it each line carries annotation and task")
    parser.add_argument("--root", help="image folder of --data (not read; only for path checks)")
    parser.add_argument("--json", type=output_file, help="also write the full report as JSON here")
    parser.add_argument("--no-meteor", dest="meteor", action="store_false", help="skip METEOR (Java)")


def eval_command(args) -> int:
    from clinkd.data.records import read_text
    from clinkd.eval.evaluate import evaluate, format_report
    from clinkd.io import write_text_atomic

    read_text(args.pred, "predictions file")  # not a regular file, or not UTF-8: one error naming file:line
    try:
        report = evaluate(args.pred, args.data, root=args.root, with_meteor=args.meteor)
    except ImportError as e:  # the caption metrics' optional dependency
        print(f"clinkd eval: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(report, indent=1))
    print(format_report(report))
    return 0
