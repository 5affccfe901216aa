"""The rows of the ablation table and the training runs that make them.

Every row trains the same number of epochs: the base (``kd`` + ``sft`` epochs of the demo's stages:
KD then SFT, or SFT alone for as many epochs), then the RCT stage's rounds, as RCT rounds or, for the
rows without RCT, as as many epochs of SFT on the ground truth (RCT's ablation). Rows that share a
base share its run: per seed, one teacher, four bases and six continuations.

    row                 positions          distillation                 after the base
    sft                 stock (gap λ = 1)  none                         SFT
    mcg                 MCG-RoPE (λ = 2)   none                         SFT
    mcg_kd              MCG-RoPE           pseudo-labels, no curriculum SFT
    mcg_kd_curriculum   MCG-RoPE           pseudo-labels + curriculum   SFT
    mcg_rct             MCG-RoPE           none                         RCT
    full                MCG-RoPE           pseudo-labels + curriculum   RCT
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from clinkd.demo.pipeline import derive_configs


@dataclass(frozen=True)
class Row:
    """One row: its name, label, base (``BASES``) and whether its last epochs are RCT rounds; ``parent``
    is the row it adds one part to (the difference the table reports), None for the first."""

    name: str
    label: str
    base: str
    rct: bool
    parent: str | None


# base name → (modality gap λ, distillation: None, "kd" or "kd_curriculum")
BASES = {"sft_stock": (1, None), "sft_mcg": (2, None), "kd": (2, "kd"), "kd_curriculum": (2, "kd_curriculum")}
ROWS = (
    Row("sft", "SFT only (stock M-RoPE, λ = 1)", "sft_stock", False, None),
    Row("mcg", "+ MCG-RoPE (λ = 2)", "sft_mcg", False, "sft"),
    Row("mcg_kd", "+ KD (pseudo-labels, no curriculum)", "kd", False, "mcg"),
    Row("mcg_kd_curriculum", "+ KD with the curriculum", "kd_curriculum", False, "mcg_kd"),
    Row("mcg_rct", "+ RCT (no KD)", "sft_mcg", True, "mcg"),
    Row("full", "full method (MCG-RoPE + KD + curriculum + RCT)", "kd_curriculum", True, "mcg_kd_curriculum"),
)
EXTRA_PAIRS = (("full", "sft"), ("mcg_rct", "mcg"), ("full", "mcg_rct"))  # also reported


def _stage(stages: list[dict], kind: str) -> dict | None:
    return next((s for s in stages if s.get("type") == kind), None)


def _epochs(mapping: dict, stage: dict | None) -> float:
    if stage is None:
        return 0.0
    return float(stage.get("training", {}).get("num_train_epochs", mapping["training"].get("num_train_epochs", 1)))


def seed_runs(mapping: dict, seed: int, out: Path, teacher_data: str | None = None) -> dict[str, dict]:
    """The run mappings of one training ``seed`` under ``out``: "teacher", one per base, and
    "<base>+sft" / "<base>+rct" continuations. ``mapping``: the demo's (with kd, sft and rct stages)."""
    from clinkd.train.errors import ConfigError

    mapping = copy.deepcopy(mapping)
    mapping["seed"], mapping["output_dir"] = seed, str(out)
    stages = mapping["stages"]
    kd, sft, rct = (_stage(stages, kind) for kind in ("kd", "sft", "rct"))
    if kd is None or sft is None or rct is None:
        raise ConfigError("the ablation needs the demo's kd, sft and rct stages (config.stages)")
    derived = derive_configs(mapping, teacher_data=teacher_data)
    runs = {"teacher": derived["teacher"]}
    base_epochs = _epochs(mapping, kd) + _epochs(mapping, sft)
    for name, (gap, distil) in BASES.items():
        run = copy.deepcopy(derived["student"])
        run["output_dir"] = str(out / name)
        run["models"]["student"].setdefault("patch", {}).setdefault("mcg_rope", {})["modality_gap"] = gap
        if distil is None:
            del run["models"]["teacher"]
            run["stages"] = [{"name": "sft", "type": "sft", "training": {"num_train_epochs": base_epochs}}]
        else:
            kd_stage = copy.deepcopy(kd)
            if distil == "kd":
                kd_stage["curriculum"] = None
            run["stages"] = [kd_stage, copy.deepcopy(sft)]
        runs[name] = run
        for after in ("sft", "rct"):
            runs[f"{name}+{after}"] = _continuation(run, rct, after, out / f"{name}+{after}")
    return runs


def _continuation(base: dict, rct: dict, after: str, out: Path) -> dict:
    """The base's final student trained on: RCT's rounds (``after="rct"``), or as many segments of SFT
    on the ground truth (``"sft"``), at RCT's training settings."""
    run = copy.deepcopy(base)
    run["output_dir"] = str(out)
    run.get("models", {}).pop("teacher", None)
    run["models"]["student"] = {
        "from_pretrained": str(Path(base["output_dir"]) / base["stages"][-1]["name"] / "final"),
        "patch": base["models"]["student"].get("patch", {}),
    }
    if after == "rct":
        run["stages"] = [copy.deepcopy(rct)]
    else:
        rounds, every = rct.get("rounds", 2), rct.get("every", "epoch")
        segment = {"num_train_epochs": 1} if every == "epoch" else {"max_steps": rct.get("steps")}
        run["stages"] = [
            {"name": f"sft-{r}", "type": "sft", "training": {**rct.get("training", {}), **segment}}
            for r in range(1, rounds + 1)
        ]
    return run


def row_run(row: Row) -> str:
    """The run whose final student is ``row``'s model."""
    return f"{row.base}+{'rct' if row.rct else 'sft'}"


def needed_runs(rows=ROWS) -> list[str]:
    """The runs of one seed, in training order (teacher first, each base before its continuations)."""
    out = ["teacher"]
    for row in rows:
        for run in (row.base, row_run(row)):
            if run not in out:
                out.append(run)
    return out
