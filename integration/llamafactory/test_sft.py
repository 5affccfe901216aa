"""clinkd inside LLaMA-Factory 0.9.5: SFT of a tiny random-weight Qwen2-VL through LLaMA-Factory's own
entry point, on the CPU, with and without clinkd.

Runs of one config (``config.yaml`` in a tmp folder; ``output_dir`` and the LoRA keys overridden on the
command line, the way LLaMA-Factory takes overrides), each a subprocess:

- stock:       ``llamafactory-cli train config.yaml``
- gap1:        ``python launch.py --modality-gap 1 --vision-stride 1 --backend cpu train config.yaml``:
               MCG-RoPE with λ = α = 1 gives transformers' own positions, so the loss curve must match
               stock's, while the fused attention and the fused loss do the work (counted)
- gap2:        ``python launch.py --backend cpu train config.yaml`` (clinkd's default λ = 2): other
               positions, so a finite curve that differs from stock's
- stock-lora, gap1-lora: the first two with LoRA (``finetuning_type=lora lora_target=all``), two
               micro-batches of one sample per step (gradient accumulation)
- gap1-torchrun: gap1 with FORCE_TORCHRUN=1, the path LLaMA-Factory takes with several devices

Run with the overlay venv (see README.md beside this file):
    .venv-integration/llamafactory/bin/python -m pytest integration/llamafactory -q
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
LAUNCHER = HERE / "launch.py"
CLI = Path(sys.executable).parent / "llamafactory-cli"

# the versions requirements.txt pins: the ones the runs must have used
PINS = dict(
    line.strip().split("==")
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if "==" in line and not line.lstrip().startswith("#")
)
STEPS = 6  # optimizer steps per run (batch 2 of 12 records: one epoch)
SEED = 42
LR = 5e-4
# Per-step relative tolerance between the stock curve and clinkd's at gap 1. Both runs are fp32 on
# the same data, order and initial weights, with the same integer positions; what differs is the
# arithmetic: clinkd rotates q/k with angles computed in-kernel (no cos/sin tables) and computes the
# lm_head + loss in row chunks with its own log-sum-exp, so fp32 sums are taken in another order
# (relative error ~1e-7 per op; step 1's loss came out bit-equal). Each optimizer step carries those
# gradient differences into the weights, so they grow with the steps and the learning rate: measured
# at most 4.7e-6 (full, lr 5e-4; 2.3e-5 at lr 1e-3) and 1e-7 (LoRA, lr 5e-3) over six steps. 1e-4
# keeps a 20x margin, while a real difference is far outside it: other positions (gap 2) differ by
# 1.2e-2 at step 1 already, and a wrong loss normalisation or a lost mask would show as much.
REL_TOL = 1e-4
# The gap-2 curve must differ from stock by far more than the tolerance: other positions, not noise.
MIN_GAP2_DIFF = 100 * REL_TOL

GAP1 = ["--modality-gap", "1", "--vision-stride", "1", "--backend", "cpu"]
# LoRA (B starts at 0: a larger lr), with two micro-batches of one per step (gradient accumulation; for
# a model with a processor LLaMA-Factory passes no num_items_in_batch: each micro-batch's mean loss)
LORA = [
    "finetuning_type=lora",
    "lora_target=all",
    "lora_rank=8",
    "learning_rate=5e-3",
    "per_device_train_batch_size=1",
    "gradient_accumulation_steps=2",
]
# torchrun as LLaMA-Factory starts it for several devices, forced here with one CPU worker
TORCHRUN = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "1"}
# name: (launcher options, or None for plain llamafactory-cli; overrides of config.yaml; environment)
VARIANTS = {
    "stock": (None, [], {}),
    "gap1": (GAP1, [], {}),
    "gap2": (["--backend", "cpu"], [], {}),
    "stock-lora": (None, LORA, {}),
    "gap1-lora": (GAP1, LORA, {}),
    "gap1-torchrun": (GAP1, [], TORCHRUN),
}

ORGANS = ["liver", "left kidney", "right lung", "spleen", "lesion", "optic disc", "polyp", "nodule"]
MODALITIES = ["CT", "MRI", "X-ray", "fundus", "dermoscopy"]
SIZES = [(32, 32), (40, 28), (28, 44), (36, 36), (48, 30), (30, 30)]


# --------------------------------------------------------------------------------------------------
# the tiny model, processor and data set


def _box(rng: random.Random) -> str:
    x1, y1 = rng.randint(0, 500), rng.randint(0, 500)
    return f"({x1},{y1}),({rng.randint(x1 + 50, 999)},{rng.randint(y1 + 50, 999)})"


def _record(i: int, rng: random.Random) -> dict:
    """One Med-GRIT-style conversation (grounding, region classification, captioning, image-level
    question), ShareGPT with role/content; record 5 has two images, record 7 two rounds."""
    organ, modality = rng.choice(ORGANS), MODALITIES[i % len(MODALITIES)]
    box = _box(rng)
    task = i % 4
    if task == 0:
        q, a = f"Where is the {organ} in this {modality} image?", f"<|box_start|>{box}<|box_end|>"
    elif task == 1:
        q, a = f"What is in the region <|box_start|>{box}<|box_end|>?", organ
    elif task == 2:
        q, a = f"Describe the region <|box_start|>{box}<|box_end|>.", f"the {organ} appears normal in size and shape"
    else:
        q, a = f"What does this {modality} image show?", f"a {modality} scan showing the {organ}"
    images = [f"images/{i:03d}.png"]
    if i == 5:
        images.append(f"images/{i:03d}b.png")
        q = "Compare the two images. " + q
    messages = [{"role": "user", "content": "<image>" * len(images) + q}, {"role": "assistant", "content": a}]
    if i == 7:
        messages += [
            {"role": "user", "content": f"Is the {organ} abnormal?"},
            {"role": "assistant", "content": rng.choice(["yes", "no"])},
        ]
    return {"messages": messages, "images": images}


def _corpus(records: list[dict]) -> list[str]:
    return [m["content"].replace("<image>", "") for r in records for m in r["messages"]] * 3


def make_dataset(folder: Path, n: int = 12, seed: int = 0) -> list[dict]:
    """dataset_info.json + train.json (ShareGPT) + PNG images under ``folder``, as the released ClinKD
    recipe lays out its Med-GRIT data for LLaMA-Factory."""
    from PIL import Image

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = [_record(i, rng) for i in range(n)]
    pixels = np.random.default_rng(seed)
    for k, rec in enumerate(records):
        for j, rel in enumerate(rec["images"]):
            w, h = SIZES[(k + j) % len(SIZES)]
            Image.fromarray(pixels.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(folder / rel)
    (folder / "train.json").write_text(json.dumps(records, indent=1))
    info = {
        "clinkd_tiny": {
            "file_name": "train.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return records


def make_model(folder: Path, records: list[dict]) -> None:
    """A random-weight Qwen2-VL (decoder hidden 256, 2 layers, 4 query / 2 KV heads of dim 64: the
    fused attention's smallest head_dim; vision depth 1, patch 4, merge 2) and a stock
    ``Qwen2VLProcessor`` whose tokenizer is trained here (clinkd's offline builder), saved with
    ``save_pretrained`` so that LLaMA-Factory loads both with the Auto classes."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from clinkd.data.offline_processor import build_offline_image_processor, build_offline_tokenizer, special_token_ids

    budget = dict(patch_size=4, merge_size=2, temporal_patch_size=1, min_pixels=16 * 16, max_pixels=32 * 32)
    tokenizer = build_offline_tokenizer(_corpus(records), vocab_size=400)
    processor = Qwen2VLProcessor(
        image_processor=build_offline_image_processor(**budget),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**budget),
        chat_template=tokenizer.chat_template,
    )
    ids = special_token_ids(tokenizer)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=None,
        pad_token_id=ids["pad_token_id"],
        eos_token_id=ids["eos_token_id"],
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[8, 12, 12]),
    )
    vision = dict(
        depth=1,
        embed_dim=32,
        hidden_size=256,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=1,
        in_channels=3,
        mlp_ratio=2,
    )
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
    )
    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration(config).float()
    with torch.no_grad():  # wider than HF's 0.02, so attention (and so the positions) shape the logits
        for name, p in model.named_parameters():
            if p.dim() > 1 and "visual" not in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


CONFIG = """\
### model
model_name_or_path: {model}
trust_remote_code: false
image_max_pixels: 1024
image_min_pixels: 256

### method
stage: sft
do_train: true
finetuning_type: full

### dataset
dataset: clinkd_tiny
dataset_dir: {data}
template: qwen2_vl
cutoff_len: 160
overwrite_cache: true
preprocessing_num_workers: 1
dataloader_num_workers: 0

### output
output_dir: {out}
logging_steps: 1
save_strategy: "no"
plot_loss: false
overwrite_output_dir: true
report_to: none

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
learning_rate: {lr}
max_steps: {steps}
lr_scheduler_type: constant
warmup_steps: 0
seed: {seed}
data_seed: {seed}
bf16: false
fp16: false
use_cpu: true
"""


# --------------------------------------------------------------------------------------------------
# running LLaMA-Factory


class Runs:
    """Builds the workspace once and runs each variant at most once per session."""

    def __init__(self, root: Path):
        self.root = root
        self.model, self.data = root / "model", root / "data"
        records = make_dataset(self.data)
        make_model(self.model, records)
        self.config = root / "config.yaml"
        self.config.write_text(
            CONFIG.format(model=self.model, data=self.data, out=root / "out-default", steps=STEPS, seed=SEED, lr=LR)
        )
        self.env = {
            **os.environ,
            "CUDA_VISIBLE_DEVICES": "",
            "HF_HOME": str(root / "hf"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "WANDB_DISABLED": "true",
            "USE_MODELSCOPE_HUB": "0",
            "USE_OPENMIND_HUB": "0",
            "USE_RAY": "0",
            "FORCE_TORCHRUN": "0",
            "PYTHONHASHSEED": "0",
        }
        self.done: dict[str, dict] = {}

    def commands(self, name: str, out: Path) -> list[str]:
        clinkd_options, overrides, _ = VARIANTS[name]
        tail = ["train", str(self.config), f"output_dir={out}", *overrides]
        if clinkd_options is None:
            return [str(CLI), *tail]
        report = ["--report", str(out / "clinkd_report.json"), "--count-ops"]
        return [sys.executable, str(LAUNCHER), *clinkd_options, *report, *tail]

    def run(self, name: str) -> dict:
        if name not in self.done:
            out = self.root / f"out-{name}"
            cmd = self.commands(name, out)
            start = time.perf_counter()
            proc = subprocess.run(
                cmd, env={**self.env, **VARIANTS[name][2]}, cwd=self.root, capture_output=True, text=True, timeout=600
            )
            seconds = time.perf_counter() - start
            log = proc.stdout + proc.stderr
            (self.root / f"{name}.log").write_text(log)
            assert proc.returncode == 0, f"{name} run failed ({' '.join(cmd)}):\n{log[-6000:]}"
            report = out / "clinkd_report.json"
            self.done[name] = {
                "losses": read_losses(out),
                "log": log,
                "seconds": seconds,
                "out": out,
                "report": json.loads(report.read_text()) if report.is_file() else None,
            }
            print(f"\n{name}: {seconds:.1f} s, losses {self.done[name]['losses']}")
        return self.done[name]


def read_losses(out: Path) -> list[float]:
    """The per-step training loss from trainer_state.json, checked against LLaMA-Factory's
    trainer_log.jsonl (both written by the run)."""
    state = json.loads((out / "trainer_state.json").read_text())
    steps = [(e["step"], e["loss"]) for e in state["log_history"] if "loss" in e]
    assert [s for s, _ in steps] == list(range(1, STEPS + 1)), f"logged steps {[s for s, _ in steps]}"
    lf_log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
    lf = [(e["current_steps"], e["loss"]) for e in lf_log if e.get("loss") is not None]
    assert lf == steps, f"trainer_log.jsonl {lf} != trainer_state.json {steps}"
    return [loss for _, loss in steps]


def safetensors_dtypes(folder: Path) -> set[str]:
    dtypes = set()
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("llamafactory"))


def rel_diff(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True)]


# --------------------------------------------------------------------------------------------------
# the tests


def check_trains(run: dict) -> None:
    losses = run["losses"]
    assert all(math.isfinite(x) for x in losses), losses
    assert abs(losses[-1] - losses[0]) > 0.05 * losses[0], f"the loss barely moves: {losses}"
    assert safetensors_dtypes(run["out"]) == {"F32"}  # trained in fp32, as the tolerance assumes


def check_patched(run: dict, *, modality_gap: int, vision_stride: int = 1) -> None:
    """The patch was active in the process that trained: the model the trainer got (under PEFT's
    wrapper for LoRA) is a class-patched Qwen2-VL with these settings, and the fused kernels ran in
    every step."""
    report = run["report"]
    assert report is not None, "the launcher wrote no report"
    assert (report["transformers"], report["llamafactory"]) == (PINS["transformers"], PINS["llamafactory"]), report
    trained = report["trained_model"]
    assert trained["class"] == "Qwen2VLForConditionalGeneration", trained
    settings = trained["clinkd"]
    assert settings is not None, "the trained model runs stock: the patch is not active"
    assert settings["mcg_rope"] == {"modality_gap": modality_gap, "vision_stride": vision_stride}, settings
    assert settings["attention"] is True and settings["loss"] is True and settings["backend"] == "cpu", settings
    ops, layers = report["ops"], 2
    # q/k rotation: at least once per decoder layer per step (here also in gradient checkpointing's
    # recompute and in the backward); the fused lm_head + loss: once per step
    assert ops.get("clinkd::mrope_rotate", 0) >= STEPS * layers, ops
    assert ops.get("clinkd::linear_kd_loss", 0) >= STEPS, ops


def check_same_curve(run: dict, stock: dict) -> None:
    a, b = run["losses"], stock["losses"]
    diffs = rel_diff(a, b)
    assert max(diffs) <= REL_TOL, f"curve {a} vs stock {b}: relative differences {diffs}"


def test_launcher_splits_its_options_from_llamafactorys():
    sys.path.insert(0, str(HERE))
    try:
        import launch
    finally:
        sys.path.remove(str(HERE))
    own, rest = launch._split(
        [
            "--modality-gap",
            "1",
            "--count-ops",
            "--report=r.json",
            "--backend",
            "cpu",
            "train",
            "c.yaml",
            "output_dir=o",
            "--x",
        ]
    )
    assert own == ["--modality-gap", "1", "--count-ops", "--report=r.json", "--backend", "cpu"]
    assert rest == ["train", "c.yaml", "output_dir=o", "--x"]
    opts = launch._parser().parse_args(own)
    assert launch._mcg_rope(opts) == {"modality_gap": 1}
    with pytest.raises(SystemExit):
        launch._mcg_rope(launch._parser().parse_args(["--stock-positions", "--vision-stride", "2"]))


def test_stock_run_trains_on_images(runs):
    stock = runs.run("stock")
    check_trains(stock)
    # the multimodal path is exercised: LLaMA-Factory prints the first tokenized example
    assert "<|vision_start|><|image_pad|>" in stock["log"], "no image placeholders in the tokenized example"


def test_clinkd_gap1_matches_stock(runs):
    stock, gap1 = runs.run("stock"), runs.run("gap1")
    check_patched(gap1, modality_gap=1)
    check_trains(gap1)
    check_same_curve(gap1, stock)


def test_clinkd_gap2_differs_from_stock(runs):
    stock, gap2 = runs.run("stock"), runs.run("gap2")
    check_patched(gap2, modality_gap=2)  # clinkd's default
    losses = gap2["losses"]
    assert all(math.isfinite(x) for x in losses), losses
    diffs = rel_diff(losses, stock["losses"])
    assert max(diffs) > MIN_GAP2_DIFF, f"gap-2 curve {losses} is the stock one {stock['losses']}: {diffs}"


def test_clinkd_gap1_lora_matches_stock_lora(runs):
    stock, gap1 = runs.run("stock-lora"), runs.run("gap1-lora")
    assert (stock["out"] / "adapter_model.safetensors").is_file()  # LoRA, not full fine-tuning
    check_trains(stock)
    check_patched(gap1, modality_gap=1)
    check_trains(gap1)
    check_same_curve(gap1, stock)


def test_clinkd_under_torchrun(runs):
    """With several devices ``llamafactory-cli train`` re-launches itself under torchrun; the launcher
    does the same with itself, so that each worker applies the patch before building its model."""
    gap1, worker = runs.run("gap1"), runs.run("gap1-torchrun")
    assert "distributed training: True" in worker["log"]
    check_patched(worker, modality_gap=1)
    check_trains(worker)
    check_same_curve(worker, gap1)
