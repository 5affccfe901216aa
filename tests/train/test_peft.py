"""LoRA (PEFT) training through ``clinkd train``: the patched student (fused M-RoPE attention and fused
loss, head_dim 64) wrapped with LoRA adapters on its text decoder, in a KD stage and an SFT stage.

* at modality gap 1 the patched run equals the same run on the stock model (per-step losses, adapters);
* only the adapters train, and they sit on q/k/v/o and the MLP of every decoder layer (none in the
  vision tower, none on the lm_head); the stage's final holds them merged, the next stage starts from it;
* the adapter reloads with ``PeftModel.from_pretrained`` to the same logits and greedy tokens as the
  trained model in memory; ``clinkd predict`` answers with the stage's final;
* RCT rounds and a full fine-tuning stage after LoRA stages, and a LoRA stage resumed from a checkpoint;
* bad LoRA settings are one-line errors naming the key, before any training.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from clinkd.cli import main
from clinkd.data.encode import SampleEncoder
from clinkd.train import ClinKDTrainer, build_model, load_config, prepare_run, run_training
from clinkd.train.specs import ModelSpec
from tests.train import setup

LAYERS = 2
TARGETS = {
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
STEPS = 3
PATCHED = {"mcg_rope": {"modality_gap": 1, "vision_stride": 1}, "attention": True, "loss": True}


def lora_config(folder: Path, data_file: Path, *, patch=PATCHED, stages=None, lora=LORA, save_steps=50) -> Path:
    """``setup.run_config`` with a student the fused attention serves (hidden 128, 2 query heads of
    dim 64, 1 KV head), patched with ``patch``, LoRA ``lora`` for every stage; KD (store) then SFT."""
    folder.mkdir(parents=True, exist_ok=True)
    path = setup.run_config(folder, data_file, kd_steps=STEPS, sft_steps=STEPS, save_steps=save_steps, lr=1e-2)
    mapping = yaml.safe_load(path.read_text())
    student = mapping["models"]["student"]
    student["config"]["text_config"].update(
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
    )
    student["config"]["vision_config"]["hidden_size"] = 128
    student["patch"] = patch
    if lora is not None:
        mapping["lora"] = lora
    if stages is not None:
        mapping["stages"] = stages
    path.write_text(yaml.safe_dump(mapping))
    return path


def prompts(prepared, n: int = 4) -> list[dict]:
    encoder = SampleEncoder(prepared.processor, max_length=512)
    return [encoder.encode_prompt(record, 0) for record in prepared.dataset.records[:n]]


@torch.no_grad()
def greedy(model, prompt_list, image_token_id: int, new: int = 8) -> list[list[int]]:
    """Greedy tokens of ``model`` for each prompt alone (no padding): the exact token sequences."""
    was = model.training
    model.eval()
    out = []
    for p in prompt_list:
        ids = p["input_ids"][None]
        tokens = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=p["pixel_values"],
            image_grid_thw=p["image_grid_thw"],
            mm_token_type_ids=(ids == image_token_id).long(),
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=new,
            min_new_tokens=new,
        )
        out.append(tokens[0, ids.shape[1] :].tolist())
    model.train(was)
    return out


@torch.no_grad()
def logits(model, batch: dict) -> torch.Tensor:
    from clinkd.data import model_inputs

    was = model.training
    model.eval()
    inputs = {k: v for k, v in model_inputs(model, batch).items() if k != "labels"}
    out = model(**inputs).logits
    model.train(was)
    return out


class Capture(TrainerCallback):
    """Per stage: the parameters (and which train) when training begins, and when it ends the trained
    model's parameters, logits on a batch and greedy tokens."""

    def __init__(self, batch, prompt_list, image_token_id):
        self.batch, self.prompts, self.image_token_id = batch, prompt_list, image_token_id
        self.begin, self.end = {}, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.begin[Path(args.output_dir).name] = {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "trainable": {n for n, p in model.named_parameters() if p.requires_grad},
        }

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.end[Path(args.output_dir).name] = {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "logits": logits(model, self.batch),
            "tokens": greedy(model, self.prompts, self.image_token_id),
        }


class StepCounter(TrainerCallback):
    """The optimizer steps each Trainer ran, by its output folder's name."""

    def __init__(self):
        self.steps = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.setdefault(Path(args.output_dir).name, []).append(state.global_step)


def steps(log: list[dict]) -> list[dict]:
    return [entry for entry in log if "loss" in entry]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same LoRA run (KD with the store, then SFT, each STEPS steps) twice: the student patched at
    modality gap 1 (``run_training``, with Capture), and stock (``patch: false``, the CLI)."""
    folder = tmp_path_factory.mktemp("lora")
    data_file = setup.tiny.make_data(folder / "data", 8, seed=11)
    patched = lora_config(folder / "patched", data_file)
    stock = lora_config(folder / "stock", data_file, patch=False)
    config = load_config(patched)
    prepared = prepare_run(config)
    batch = prepared.collator([prepared.dataset[i] for i in range(4)])
    image_token_id = prepared.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    capture = Capture(batch, prompts(prepared), image_token_id)
    results = run_training(config, progress=False, callbacks=[capture])
    assert main(["train", "--config", str(stock), "--no-progress"]) == 0
    return {
        "folder": folder,
        "data": data_file,
        "config": config,
        "prepared": prepared,
        "batch": batch,
        "capture": capture,
        "results": results,
        "patched": folder / "patched" / "out",
        "stock": folder / "stock" / "out",
        "image_token_id": image_token_id,
    }


def _stage(out: Path, name: str) -> dict:
    return json.loads((out / name / "stage.json").read_text())


def test_patched_lora_run_equals_the_stock_lora_run(runs):
    """Gap 1 is the stock positions, so the patched run (fused attention through the LoRA q/k/v/o layers,
    the trainer's fused loss on the frozen lm_head) must train like the stock one. fp32 tolerance: the
    fused attention sums in another order than the stock path, ~1e-7 relative (measured: losses within
    1.2e-7 relative, the small KD term within 3e-8 absolute); Adam turns a gradient that small into
    adapter steps that differ by a small fraction of the learning rate (1e-2): measured 1.1e-5 after the
    six steps, against 1e-4 allowed (1 % of one step). Fused attention that skipped the q/k/v/o adapters
    would be off by 4e-4 to 1.5e-2 relative in the losses from the second step on."""
    for stage in ("kd", "sft"):
        patched = steps(_stage(runs["patched"], stage)["log_history"])
        stock = steps(_stage(runs["stock"], stage)["log_history"])
        assert len(patched) == len(stock) == STEPS
        for key in ("loss", "ce_loss") + (("kd_loss",) if stage == "kd" else ()):
            assert [h[key] for h in patched] == pytest.approx([h[key] for h in stock], rel=1e-5, abs=1e-7), (stage, key)
        assert patched[-1]["loss"] < patched[0]["loss"]  # the adapters learn
        want = load_file(str(runs["stock"] / stage / "adapter" / "adapter_model.safetensors"))
        got = load_file(str(runs["patched"] / stage / "adapter" / "adapter_model.safetensors"))
        assert want.keys() == got.keys() and want
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-4, msg=name)
            if ".lora_B." in name:  # zero at init: trained
                assert want[name].abs().max() > 1e-3, name


def _module(name: str) -> str:
    """A LoRA parameter's module path inside the transformers model."""
    return name.removeprefix("base_model.model.").split(".lora_")[0]


def test_only_the_adapters_train_on_the_text_decoder(runs):
    capture, out = runs["capture"], runs["patched"]
    expected = {f"model.language_model.layers.{i}.{t}" for i in range(LAYERS) for t in TARGETS}
    initial = build_model(runs["config"].student, runs["prepared"].model_configs["student"], seed=runs["config"].seed)
    initial = {n: p.detach() for n, p in initial.named_parameters()}
    for stage in ("kd", "sft"):
        begin, end = capture.begin[stage], capture.end[stage]
        assert begin["trainable"] and all(".lora_" in n for n in begin["trainable"])
        assert {_module(n) for n in begin["trainable"]} == expected
        assert {_module(n) for n in begin["params"] if ".lora_" in n} == expected  # no adapter elsewhere
        base = {n: p for n, p in end["params"].items() if ".lora_" not in n}
        for name, value in base.items():  # every base weight bit-identical to the stage's starting one
            assert torch.equal(value, begin["params"][name]), (stage, name)
        changed = [n for n in begin["trainable"] if not torch.equal(end["params"][n], begin["params"][n])]
        assert len(changed) == len(begin["trainable"])
        saved = load_file(str(out / stage / "adapter" / "adapter_model.safetensors"))
        assert {_module(n) for n in saved} == expected
        config = json.loads((out / stage / "adapter" / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)

    # The kd stage started from the seeded random init; the sft stage from kd's final (the merged
    # model on disk), bit for bit: the base weights in memory are what final holds.
    plain = lambda n: n.removeprefix("base_model.model.").replace(".base_layer.", ".")  # noqa: E731
    kd_begin = {plain(n): p for n, p in capture.begin["kd"]["params"].items() if ".lora_" not in n}
    assert kd_begin.keys() == initial.keys()
    assert all(torch.equal(kd_begin[n], initial[n]) for n in initial)
    from transformers import AutoModelForImageTextToText

    kd_final = dict(AutoModelForImageTextToText.from_pretrained(str(out / "kd" / "final")).named_parameters())
    sft_begin = {plain(n): p for n, p in capture.begin["sft"]["params"].items() if ".lora_" not in n}
    assert sft_begin.keys() == kd_final.keys()
    assert all(torch.equal(sft_begin[n], kd_final[n].detach()) for n in kd_final)

    # kd's final = its starting weights with the adapters merged into the targets, the rest untouched.
    scale = LORA["alpha"] / LORA["r"]
    trained = capture.end["kd"]["params"]
    for name, value in kd_final.items():
        module = name.rsplit(".", 1)[0]
        if module in expected and name.endswith(".weight"):
            key = f"base_model.model.{module}.lora_%s.default.weight"
            delta = scale * trained[key % "B"] @ trained[key % "A"]
            torch.testing.assert_close(value.detach(), initial[name] + delta, rtol=0, atol=1e-6)
            assert delta.abs().max() > 1e-4
        else:
            assert torch.equal(value.detach(), initial[name]), name


def test_adapter_reloads_to_the_trained_model_and_predict_runs(runs, tmp_path, capsys):
    from peft import PeftModel

    capture, out, config, prepared = runs["capture"], runs["patched"], runs["config"], runs["prepared"]
    cfg = prepared.model_configs["student"]
    bases = {
        "kd": build_model(config.student, cfg, seed=config.seed),  # a config student: rebuilt from the seed
        "sft": build_model(
            ModelSpec(from_pretrained=str(out / "kd" / "final"), patch=config.student.patch), cfg, seed=config.seed
        ),
    }
    for stage, base in bases.items():
        recorded = json.loads((out / stage / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert recorded == (None if stage == "kd" else str(out / "kd" / "final"))
        reloaded = PeftModel.from_pretrained(base, str(out / stage / "adapter"))
        want = capture.end[stage]
        torch.testing.assert_close(logits(reloaded, runs["batch"]), want["logits"], rtol=0, atol=1e-6)
        assert greedy(reloaded, capture.prompts, runs["image_token_id"]) == want["tokens"]
        # the merged final: the same model up to the rounding of the merge
        merged = build_model(
            ModelSpec(from_pretrained=str(out / stage / "final"), patch=config.student.patch), cfg, seed=config.seed
        )
        torch.testing.assert_close(logits(merged, runs["batch"]), want["logits"], rtol=0, atol=1e-4)

    preds = tmp_path / "preds.jsonl"
    assert (
        main(
            [
                "predict",
                "--model",
                str(out / "sft" / "final"),
                "--data",
                str(runs["data"]),
                "--out",
                str(preds),
                "--max-new-tokens",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 8 and all(isinstance(r["response"], str) for r in rows)
    assert "8 predictions" in capsys.readouterr().out
    # pointed at the adapter folder, predict says where the model is
    assert (
        main(
            [
                "predict",
                "--model",
                str(out / "sft" / "adapter"),
                "--data",
                str(runs["data"]),
                "--out",
                str(preds),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "LoRA adapter" in err and str(out / "sft" / "final") in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# later stages: RCT rounds with LoRA, full fine-tuning after LoRA, resuming


CHAIN = [
    {"name": "sft", "type": "sft", "training": {"max_steps": 2, "save_steps": 1, "gradient_checkpointing": True}},
    {
        "name": "rct",
        "type": "rct",
        "rounds": 2,
        "every": "steps",
        "steps": 1,
        "batch_size": 4,
        "max_new_tokens": 4,
        "candidates": 2,
        "mode": "join",
        "similarity": {"model": "rouge-l"},
        "lora": {"r": 2},
    },
    {"name": "full", "type": "sft", "lora": False, "training": {"max_steps": 2}},
]


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def _targeted(name: str) -> bool:
    """A weight with an adapter, by its name in a final folder (the hub layout: model.layers.i...)."""
    return name.startswith("model.layers.") and any(name.endswith(f".{t}.weight") for t in TARGETS)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """LoRA SFT (gradient checkpointing, a checkpoint every step), two RCT rounds with a LoRA of their
    own (r 2 over the run's settings), then full fine-tuning: through the CLI."""
    folder = tmp_path_factory.mktemp("chain")
    data_file = setup.tiny.make_data(folder / "data", 8, seed=3)
    path = lora_config(folder / "run", data_file, stages=CHAIN)
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    return folder / "run"


def test_rct_rounds_train_adapters_then_full_finetuning_trains_everything(chain):
    out = chain / "out"
    sft = _weights(out / "sft" / "final")
    previous = out / "sft" / "final"
    for r in (1, 2):
        round_dir = out / "rct" / f"round-{r}"
        record = json.loads((round_dir / "round.json").read_text())
        assert record["adapter"] == str(round_dir / "adapter") and record["lora"]["r"] == 2
        config = json.loads((round_dir / "adapter" / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (2, 8, str(previous))
        previous = round_dir / "final"
    rct = _weights(out / "rct" / "round-2" / "final")
    assert rct.keys() == sft.keys() and sum(map(_targeted, rct)) == LAYERS * len(TARGETS)
    assert all(torch.equal(rct[n], sft[n]) for n in sft if not _targeted(n))  # RCT trained adapters only
    assert all(not torch.equal(rct[n], sft[n]) for n in sft if _targeted(n))
    full = _weights(out / "full" / "final")
    assert not (out / "full" / "adapter").exists() and "adapter" not in _stage(out, "full")
    # full fine-tuning after LoRA stages: the weights PEFT froze train again (vision tower, lm_head, ...)
    untouched = [n for n in rct if not torch.equal(full[n], rct[n])]
    assert len(untouched) > 0.9 * len(rct)
    assert any("visual" in n for n in untouched) and any("lm_head" in n for n in untouched)


def test_a_resumed_lora_stage_and_stages_loaded_from_disk_train_the_same(chain, tmp_path):
    """The LoRA stage interrupted after its step-1 checkpoint (with a half-written adapter and final
    staging folder left behind) resumes from it; a stage after complete LoRA stages loads their merged
    final from disk. Either way every folder ends as the straight run's, bit for bit."""
    want = {k: _weights(chain / "out" / k) for k in ("sft/final", "rct/round-2/final", "full/final")}
    want_adapter = load_file(str(chain / "out" / "sft" / "adapter" / "adapter_model.safetensors"))

    interrupted = tmp_path / "interrupted"
    shutil.copytree(chain, interrupted)
    out = interrupted / "out"
    for name in ("stage.json", "final", "adapter", "checkpoint-2"):
        path = out / "sft" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name in ("rct", "full"):
        shutil.rmtree(out / name)
    (out / "sft" / "adapter").mkdir()
    (out / "sft" / "adapter" / "adapter_model.safetensors").write_bytes(b"torn")
    (out / "sft" / ".final.partial").mkdir()
    counter = StepCounter()
    run_training(load_config(interrupted / "run.yaml"), progress=False, callbacks=[counter])  # what the CLI runs
    assert counter.steps["sft"] == [2]  # resumed: only step 2 ran
    log = steps(_stage(out, "sft")["log_history"])
    assert [h["step"] for h in log] == [1, 2]
    assert not (out / "sft" / ".final.partial").exists() and not (out / "sft" / ".adapter.partial").exists()
    got_adapter = load_file(str(out / "sft" / "adapter" / "adapter_model.safetensors"))
    assert got_adapter.keys() == want_adapter.keys()
    assert all(torch.equal(got_adapter[n], want_adapter[n]) for n in want_adapter)

    from_disk = tmp_path / "from_disk"
    shutil.copytree(chain, from_disk)
    shutil.rmtree(from_disk / "out" / "full")
    assert main(["train", "--config", str(from_disk / "run.yaml"), "--no-progress"]) == 0

    for run in (interrupted, from_disk):
        for key, weights in want.items():
            got = _weights(run / "out" / key)
            assert got.keys() == weights.keys()
            assert all(torch.equal(got[n], weights[n]) for n in weights), (run.name, key)


def test_qwen2_5_vl_vision_tower_gets_no_adapter(tmp_path):
    """Qwen2.5-VL's vision blocks have gate_proj/up_proj/down_proj layers too: the default targets put
    adapters on the text decoder's only, and the tower's weights stay as they were."""
    from transformers import AutoModelForImageTextToText

    from tests.train.setup import QWEN2_5_VL

    data_file = setup.tiny.make_data(tmp_path / "data", 4, seed=2)
    path = lora_config(
        tmp_path,
        data_file,
        patch={"attention": False},
        lora={},
        stages=[{"name": "sft", "type": "sft", "training": {"max_steps": 1}}],
    )
    mapping = yaml.safe_load(path.read_text())
    mapping["models"]["student"]["config"] = copy.deepcopy(QWEN2_5_VL)
    mapping["processor"]["offline"]["temporal_patch_size"] = 2  # the tower's
    path.write_text(yaml.safe_dump(mapping))
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    adapter = load_file(str(tmp_path / "out" / "sft" / "adapter" / "adapter_model.safetensors"))
    assert {_module(n) for n in adapter} == {f"model.language_model.layers.{i}.{t}" for i in range(2) for t in TARGETS}
    config = load_config(path)
    initial = build_model(config.student, prepare_run(config).model_configs["student"], seed=config.seed)
    final = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "out" / "sft" / "final"))
    tower = {n: p for n, p in final.named_parameters() if "visual" in n}
    assert any(".mlp.gate_proj." in n for n in tower)  # what a plain name list would have matched
    initial = dict(initial.named_parameters())
    assert all(torch.equal(p, initial[n]) for n, p in tower.items())


# ---------------------------------------------------------------------------------------------------
# bad settings


@pytest.fixture
def no_training(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("training started despite a bad config")

    monkeypatch.setattr(ClinKDTrainer, "train", refuse)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    data_file = setup.tiny.make_data(folder / "data", 4, seed=6)
    return lora_config(folder, data_file, stages=[{"name": "sft", "type": "sft", "training": {"max_steps": 1}}])


ZERO3 = "{zero_optimization: {stage: 3, stage3_gather_16bit_weights_on_model_save: true}}"


BAD = [
    ("lora.r=0", "config.lora.r must be >= 1, got 0"),
    ("lora.r=2.5", "config.lora.r must be an integer, got 2.5"),
    ("lora.alpha=0", "config.lora.alpha must be > 0, got 0"),
    ("lora.alpha=.inf", "config.lora.alpha must be a finite number, got inf"),
    ("lora.dropout=1.0", "config.lora.dropout must be < 1, got 1.0"),
    ("lora.dropout=-0.1", "config.lora.dropout must be >= 0, got -0.1"),
    ("lora.rslora=1", "config.lora.rslora must be true or false, got 1"),
    ("lora.rank=8", "config.lora: unknown key(s) rank; allowed: r, alpha, dropout, target_modules, rslora"),
    ("lora=8", "config.lora must be a mapping of LoRA settings"),
    ("lora.target_modules=[]", "config.lora.target_modules must be a non-empty list of layer names"),
    ("lora.target_modules=q_proj", "config.lora.target_modules must be a non-empty list of layer names"),
    ("lora.target_modules=[q_proj, 3]", "config.lora.target_modules[1] must be the name of a linear layer"),
    ("lora.target_modules=[q_proj, q_proj]", "config.lora.target_modules names q_proj more than once"),
    (
        "lora.target_modules=[q_proj, qproj]",
        "config.lora.target_modules: 'qproj' is not a linear layer of the "
        "student's text decoder (its linear layers: down_proj, gate_proj, k_proj, "
        "o_proj, q_proj, up_proj, v_proj)",
    ),
    (
        "lora.target_modules=[qkv, lm_head]",
        "config.lora.target_modules: 'qkv', 'lm_head' are not linear layers of the student's text decoder",
    ),
    ("stages.0.lora.r=-1", "config.stages[0].lora.r must be >= 1, got -1"),
    ("stages.0.lora.target_modules=[fc1]", "config.stages[0].lora.target_modules: 'fc1' is not a linear layer"),
    (
        f"training.deepspeed={ZERO3}",
        "config.lora: stage 'sft' trains LoRA adapters, which cannot run under DeepSpeed ZeRO-3",
    ),
]


@pytest.mark.parametrize(
    "command, override, message", [("train", *case) for case in BAD] + [("check", *case) for case in BAD[::4]]
)
def test_bad_lora_settings_are_one_line_errors(small, capsys, no_training, command, override, message):
    """``clinkd train`` and ``clinkd check`` (every fourth case) refuse it: exit 2, one line naming the key."""
    args = [command, "--config", str(small), "--set", override] + (["--no-progress"] if command == "train" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (small.parent / "out" / "sft").exists()


def test_lora_settings_of_the_run_and_of_each_stage(small):
    """A stage's ``lora``: absent = the run's, a mapping = its keys over the run's, true = the run's (or the
    defaults), false or null = full fine-tuning."""
    from clinkd.train import LoraSpec

    stages = (
        "stages=[{name: a, type: sft}, {name: b, type: sft, lora: {r: 2, target_modules: [q_proj]}}, "
        "{name: c, type: sft, lora: true}, {name: d, type: sft, lora: false}, {name: e, type: sft, lora: null}]"
    )
    config = load_config(small, overrides=[stages])
    run = LoraSpec(r=4, alpha=8, dropout=0.0)
    assert config.lora == run
    assert [s.lora for s in config.stages] == [run, LoraSpec(r=2, alpha=8, target_modules=("q_proj",)), run, None, None]
    assert [s.lora_key for s in config.stages][:2] == ["config.lora", "config.stages[1].lora"]
    config = load_config(small, overrides=["lora=null", stages])
    assert config.lora is None
    assert [s.lora for s in config.stages] == [None, LoraSpec(r=2, target_modules=("q_proj",)), LoraSpec(), None, None]
    assert load_config(small, overrides=["lora=true"]).lora == LoraSpec()


def test_lora_without_peft_is_refused_by_name(small, capsys, no_training, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft fails as it does where it is not installed
    assert main(["train", "--config", str(small), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "config.lora: LoRA training needs the peft package (>= 0.18): pip install 'clinkd[peft]'" in err
    assert len(err.strip().splitlines()) == 1


def test_the_peft_extra():
    extras = setup.setup_extras()
    assert "peft>=0.18" in extras["peft"] and set(extras["hf"]) <= set(extras["peft"])
    assert "peft>=0.18" in extras["test"]
    from clinkd.train.lora import MIN_PEFT

    assert f"peft>={MIN_PEFT}" in extras["peft"]
