"""``clinkd experiment ablation`` on a tiny configuration: every row over 2 seeds, the report files, the
seed statistics computed from the per-seed scores, and the RCT pass counts from the rounds' files."""

import json

import numpy as np
import pytest

from clinkd.experiment.rows import BASES, ROWS, needed_runs, row_run

TINY_STAGES = (
    "stages=[{name: kd, type: kd, teacher: store, topk: 8, curriculum: {start_fraction: 0.5, "
    "warmup_steps: 2}, training: {num_train_epochs: 1}}, {name: sft, type: sft, "
    "training: {num_train_epochs: 1}}, {name: rct, type: rct, rounds: 1, batch_size: 8, "
    "max_new_tokens: 8, candidates: 2}]"
)


def test_rows_share_bases_and_every_row_has_a_run():
    runs = needed_runs()
    assert runs[0] == "teacher" and len(runs) == 1 + len(BASES) + len(ROWS)
    for row in ROWS:
        assert runs.index(row.base) < runs.index(row_run(row))  # a base trains before its continuations
        assert row.parent is None or row.parent in {r.name for r in ROWS}


def test_seed_runs_train_equal_epochs(tmp_path):
    from clinkd.demo.pipeline import _demo_mapping
    from clinkd.experiment.rows import seed_runs

    runs = seed_runs(_demo_mapping(None, [f"output_dir={tmp_path}"]), 5, tmp_path / "seed-5")
    epochs = {}
    for name, run in runs.items():
        assert run["seed"] == (6 if name == "teacher" else 5)
        epochs[name] = sum(s.get("training", {}).get("num_train_epochs", 0) for s in run["stages"])
    assert epochs["sft_stock"] == epochs["sft_mcg"] == epochs["kd"] == epochs["kd_curriculum"] == 6
    assert runs["kd"]["stages"][0]["curriculum"] is None and runs["kd_curriculum"]["stages"][0]["curriculum"]
    gaps = {n: runs[n]["models"]["student"]["patch"]["mcg_rope"]["modality_gap"] for n in BASES}
    assert gaps == {"sft_stock": 1, "sft_mcg": 2, "kd": 2, "kd_curriculum": 2}
    assert "teacher" not in runs["sft_mcg"]["models"] and "teacher" in runs["kd"]["models"]
    assert [s["type"] for s in runs["kd+rct"]["stages"]] == ["rct"]
    assert [s["type"] for s in runs["kd+sft"]["stages"]] == ["sft", "sft"]  # RCT's 2 rounds as SFT epochs
    assert runs["kd+rct"]["models"]["student"]["from_pretrained"].endswith("seed-5/kd/sft/final")


@pytest.mark.slow
def test_ablation_end_to_end_tiny(tmp_path, capsys):
    from clinkd.cli import main
    from clinkd.demo.data import build_demo_data

    design = {"teacher_extra_per_modality": 1, "reflections": 0.5}
    build_demo_data(tmp_path / "data", train_per_modality=1, test_per_modality=1, **design)
    results = tmp_path / "results"
    overrides = [
        f"output_dir={tmp_path / 'out'}",
        f"data.train={tmp_path / 'data' / 'train.jsonl'}",
        "training.per_device_train_batch_size=8",
        TINY_STAGES,
    ]
    argv = ["experiment", "ablation", "--seeds", "2", "--resamples", "20", "--results", str(results)]
    assert main([*argv, "--no-progress", *(a for o in overrides for a in ("--set", o))]) == 0
    printed = capsys.readouterr().out
    assert "| full method (MCG-RoPE + KD + curriculum + RCT) |" in printed and "| full − sft |" in printed

    report = json.loads((results / "ablation.json").read_text())
    assert report["data"]["design"] == design and report["data"]["reflection_records"] > 0
    assert report["seeds"] == [0, 1] and (results / "ablation.md").read_text().startswith("# ClinKD ablation")
    assert json.loads((tmp_path / "out" / "ablation.json").read_text()) == report
    assert report["reference"]["name"] == "teacher" and "| teacher (reference" in printed
    for name in ["teacher", *(row.name for row in ROWS)]:
        for seed in (0, 1):  # the teacher and every row's model predicted every test question for every seed
            lines = (tmp_path / "out" / f"seed-{seed}" / "predictions" / f"{name}.jsonl").read_text()
            assert len(lines.splitlines()) == 20
        block = report["scores"][name]["ROC"]["Accuracy"]
        assert block["mean"] == pytest.approx(np.mean(block["per_seed"]))
        assert block["sd"] == pytest.approx(np.std(block["per_seed"], ddof=1))
        low, high = block["interval"]
        assert 0 <= low <= high <= 100
    diff = report["differences"]["full - sft"]["ROC"]["Accuracy"]
    got = [
        a - b
        for a, b in zip(
            report["scores"]["full"]["ROC"]["Accuracy"]["per_seed"],
            report["scores"]["sft"]["ROC"]["Accuracy"]["per_seed"],
        )
    ]
    assert diff["per_seed"] == pytest.approx(got)
    assert diff["holds"] == (diff["clear"] and len({np.sign(d) for d in got}) == 1 and np.mean(got) != 0)
    for seed in ("0", "1"):
        for row in ("mcg_rct", "full"):
            (summary,) = report["rct"][seed][row]  # one round
            folder = tmp_path / "out" / f"seed-{seed}" / row_run(next(r for r in ROWS if r.name == row))
            lines = [json.loads(x) for x in (folder / "rct" / "round-1" / "corrections.jsonl").read_text().splitlines()]
            assert summary["checked"] == len(lines) and summary["wrong"] == sum(x["wrong"] for x in lines)
            assert summary["by_candidate"] == sum(x["choice"] == "candidate" for x in lines)


def test_seeds_argument_is_checked(capsys):
    from clinkd.cli import main

    assert main(["experiment", "ablation", "--seeds", "0"]) == 2
    assert "--seeds: must be a positive integer" in capsys.readouterr().err
