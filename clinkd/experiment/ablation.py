"""``clinkd experiment ablation``: every row of ``rows.ROWS`` trained over several seeds on the demo's
data, scored on its test split, summarised across seeds and test questions (``summary``).

    report = run_ablation(seeds=[0, 1, 2], overrides=["output_dir=runs/ablation"])

Per training seed s (the run's seed, so model initialisation and data order), under OUT/seed-s: the
teacher, then the runs of ``rows.needed_runs`` (``clinkd train``'s ``run_training``, resumable), then
greedy predictions of each row's model on the test split (OUT/seed-s/predictions/<row>.jsonl). The test
split and the data are the same for every seed: the seeds vary the training, the bootstrap the test
questions. The report goes to OUT/ablation.json and OUT/ablation.md, and to ``results`` when given.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from .rows import ROWS, needed_runs, row_run, seed_runs

DEFAULTS = ("output_dir=runs/ablation",)  # under the user's --set; the data are the demo's (demo_data/)


def run_ablation(
    config_path=None,
    *,
    seeds: list[int],
    overrides: list[str] | None = None,
    results: str | os.PathLike | None = None,
    resamples: int = 1000,
    batch_size: int = 20,
    max_new_tokens: int = 48,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Train, predict and score every row for every seed in ``seeds``; returns the report (``summary``)."""
    from clinkd.demo.pipeline import _commit, _demo_mapping, _ensure_data, _teacher_data, _torch_threads, data_info

    from .summary import summarise, write_summary

    if (
        not seeds
        or len(set(seeds)) != len(seeds)
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
    ):
        raise ValueError(f"seeds must be distinct non-negative integers, got {seeds!r}")
    started, commit = time.perf_counter(), _commit()  # the code that trains, before any later edit
    mapping = _demo_mapping(config_path, [*DEFAULTS, *(overrides or [])])
    out = Path(mapping["output_dir"])
    timings: dict = {}
    test = _ensure_data(mapping, [], progress=progress)
    teacher_data = _teacher_data(test)
    predictions, rct = {}, {}
    for seed in seeds:
        folder = out / f"seed-{seed}"
        runs = seed_runs(mapping, seed, folder, teacher_data)
        finals = _train_seed(runs, timings, seed, resume=resume, progress=progress)
        rct[seed] = {row.name: _rct_rounds(finals[row_run(row)]) for row in ROWS if row.rct}
        t = time.perf_counter()
        predictions[seed] = _predict_rows(
            runs, finals, mapping, test, folder, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress
        )
        timings[f"seed-{seed}/predict"] = time.perf_counter() - t
    t = time.perf_counter()
    report = summarise(predictions, test, resamples=resamples, seed=int(mapping.get("seed", 0)), progress=progress)
    timings["scores"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    report.update(
        rct=rct,
        timings_s={k: round(v, 1) for k, v in timings.items()},
        machine={
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": _torch_threads(),
        },
        commit=commit,
        config=mapping,
        data=data_info(test),
    )
    write_summary(report, out)
    if results is not None:
        write_summary(report, Path(results))
    return report


def _train_seed(runs: dict, timings: dict, seed: int, *, resume: bool, progress: bool) -> dict[str, dict]:
    """Train one seed's runs in order; returns {run: run_training's result}."""
    from clinkd.train.config import parse_config
    from clinkd.train.run import run_training

    finals = {}
    for name in needed_runs():
        t = time.perf_counter()
        if progress:
            print(f"[ablation] seed {seed}: training {name}", flush=True)
        finals[name] = run_training(parse_config(runs[name]), resume=resume, progress=progress)
        timings[f"seed-{seed}/{name}"] = time.perf_counter() - t
    return finals


def _final(result: dict) -> str:
    return list(result.values())[-1]["final"]


def _rct_rounds(result: dict) -> list[dict]:
    """Per RCT round: questions checked, wrong, corrected by a candidate, kept the ground truth."""
    from clinkd.rct.cli import round_report

    out = []
    for stage in result.values():
        for r in stage.get("rounds", ()):
            every = round_report(Path(r["final"]).parent)["summary"]["all"]
            out.append({k: every[k] for k in ("checked", "wrong", "by_candidate", "by_ground_truth")})
    return out


def _predict_rows(runs, finals, mapping, test, folder, *, batch_size, max_new_tokens, progress) -> dict[str, Path]:
    """Greedy predictions of the teacher and of each row's model on ``test``; returns {name: predictions file}."""
    from clinkd.data.offline_processor import load_processor
    from clinkd.eval.predict import load_model, predict
    from clinkd.train.config import parse_config

    from .summary import REFERENCE

    processor = load_processor(str(Path(runs["teacher"]["output_dir"]) / "processor"))
    files = {}
    for name, run in [(REFERENCE[0], "teacher"), *((row.name, row_run(row)) for row in ROWS)]:
        model = load_model(_final(finals[run]), patch=parse_config(runs[run]).student.patch)
        files[name] = folder / "predictions" / f"{name}.jsonl"
        if progress:
            print(f"[ablation] predicting with {name}", flush=True)
        predict(
            model,
            processor,
            test,
            files[name],
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_length=int(mapping["data"].get("max_length", 2048)),
            progress=progress,
        )
        del model
    return files


def _cpu_name() -> str | None:
    """The CPU's model name (Linux), for the report: scores depend on the CPU kind."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
