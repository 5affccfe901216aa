"""Greedy batched prediction with a tiny random model: output lines, batching = one by one, the positions
the model was trained with, bad input."""

import copy
import json

import pytest
import torch

from clinkd.cli import main
from clinkd.data.encode import SampleEncoder
from clinkd.data.offline_processor import build_offline_processor, special_token_ids
from clinkd.data.records import DataError, load_records
from clinkd.demo.data import build_demo_data
from clinkd.demo.pipeline import demo_preset
from clinkd.eval.predict import load_model, predict
from clinkd.train.artifacts import write_patch_record
from clinkd.train.config import model_spec
from clinkd.train.models import build_model, model_config
from clinkd_kernels import mcg_rope_index


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = build_demo_data(tmp_path_factory.mktemp("data"), seed=3, train_per_modality=1, test_per_modality=1)
    records = load_records(folder / "train.jsonl")
    processor = build_offline_processor(
        [t for r in records for pair in r.turns for t in pair], vocab_size=400, min_pixels=32 * 32, max_pixels=32 * 32
    )
    raw = demo_preset()["models"]["student"]
    spec = model_spec("student", raw, default_patch={})
    model = build_model(spec, model_config(spec, processor.tokenizer, "student"), seed=0)
    saved = tmp_path_factory.mktemp("model")
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    test = folder / "test.jsonl"
    lines = test.read_text().splitlines()[:6]
    test.write_text("\n".join(lines) + "\n")
    return folder, test, processor, model, saved, spec.patch.options()  # the patch_qwen2_vl keywords


def test_batched_equals_one_by_one(setup, tmp_path):
    folder, test, processor, model, _, _ = setup
    n = predict(model, processor, test, tmp_path / "a.jsonl", batch_size=4, max_new_tokens=6, progress=False)
    predict(model, processor, test, tmp_path / "b.jsonl", batch_size=1, max_new_tokens=6, progress=False)
    a = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert n == 6 and [x["id"] for x in a] == [r.id for r in load_records(test)]
    assert [x["response"] for x in a] == [x["response"] for x in b]  # left padding changes nothing
    assert all(x["annotation"] and x["task"] in ("VG", "ROC", "RC", "MIA") for x in a)


def test_cli_predict_then_eval(setup, tmp_path, capsys):
    folder, test, _, _, saved, patch = setup
    out = tmp_path / "p.jsonl"
    args = [
        "predict",
        "--model",
        str(saved),
        "--data",
        str(test),
        "--out",
        str(out),
        "--batch-size",
        "3",
        "--max-new-tokens",
        "4",
        "--patch",
        json.dumps(patch),
        "--no-progress",
    ]
    assert main(args) == 0
    assert main(["eval", "--pred", str(out), "--data", str(test), "--no-meteor"]) == 0
    assert "predictions scored" in capsys.readouterr().out


def test_bad_input(setup, tmp_path, capsys):
    folder, test, processor, model, saved, _ = setup
    rows = [json.loads(x) for x in test.read_text().splitlines()]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps(dict(rows[1], image="images/none.png")) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2 .*does not exist"):
        predict(model, processor, bad, tmp_path / "o.jsonl", root=folder, progress=False)
    bad.write_text(json.dumps(dict(rows[0], id="sonar_1")) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1 .*unknown modality 'sonar'"):
        predict(model, processor, bad, tmp_path / "o.jsonl", root=folder, progress=False)
    bad.write_text(json.dumps(rows[0]) + "\n{oops\n")
    assert (
        main(
            [
                "predict",
                "--model",
                str(saved),
                "--data",
                str(bad),
                "--root",
                str(folder),
                "--out",
                str(tmp_path / "o.jsonl"),
            ]
        )
        == 2
    )
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch_size"):
        predict(model, processor, test, tmp_path / "o.jsonl", batch_size=0, progress=False)
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path))
    assert (
        main(
            [
                "predict",
                "--model",
                str(saved),
                "--data",
                str(test),
                "--out",
                str(tmp_path / "o.jsonl"),
                "--patch",
                "{bad",
            ]
        )
        == 2
    )
    assert not (tmp_path / "o.jsonl").exists()


def test_every_turn_of_a_multi_turn_record(setup, tmp_path):
    """A two-turn record gives two lines (turn 0 and 1); turn 0's answer is the one the single-turn
    record gets (the second question does not leak into the first prompt); eval pairs both turns."""
    folder, test, processor, model, _, _ = setup
    rows = [json.loads(x) for x in test.read_text().splitlines()]
    rows = [next(r for r in rows if r["task"] == "ROC"), next(r for r in rows if r["task"] == "VG")]
    two = dict(
        rows[0],
        conversations=rows[0]["conversations"]
        + [{"from": "human", "value": "Is it large?"}, {"from": "gpt", "value": "no"}],
    )
    data = folder / "two.jsonl"
    data.write_text(json.dumps(two) + "\n" + json.dumps(rows[1]) + "\n")
    single = folder / "one.jsonl"
    single.write_text(json.dumps(rows[0]) + "\n")
    assert predict(model, processor, data, tmp_path / "p.jsonl", batch_size=2, max_new_tokens=5, progress=False) == 3
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(x["id"], x["turn"]) for x in lines] == [(rows[0]["id"], 0), (rows[0]["id"], 1), (rows[1]["id"], 0)]
    assert lines[1]["question"] == "Is it large?" and lines[1]["annotation"] == "no"
    predict(model, processor, single, tmp_path / "s.jsonl", batch_size=1, max_new_tokens=5, progress=False)
    assert json.loads((tmp_path / "s.jsonl").read_text())["response"] == lines[0]["response"]
    from clinkd.eval.evaluate import evaluate

    assert evaluate(tmp_path / "p.jsonl", data, with_meteor=False)["missing"] == 0


def _greedy_reference(model, encoder, record, turn: int, steps: int, gap: int) -> str:
    """The answer as ``predict`` decodes it, from full forwards without a cache fed ``mcg_rope_index``'s
    positions explicitly (no generate(), no patch: independent of how the model finds positions)."""
    ids = special_token_ids(encoder.tokenizer)
    prompt = encoder.encode_prompt(record, turn)
    tokens = prompt["input_ids"][None]
    for _ in range(steps):
        positions, _ = mcg_rope_index(
            tokens,
            image_grid_thw=prompt["image_grid_thw"],
            image_token_id=ids["image_token_id"],
            video_token_id=ids["video_token_id"],
            modality_gap=gap,
            pad_position=0,
        )
        with torch.no_grad():
            logits = model(
                input_ids=tokens,
                attention_mask=torch.ones_like(tokens),
                position_ids=positions,
                pixel_values=prompt["pixel_values"],
                image_grid_thw=prompt["image_grid_thw"],
            ).logits
        token = int(logits[0, -1].argmax())
        if token == ids["eos_token_id"]:
            break
        tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
    new = [t for t in tokens[0, prompt["input_ids"].numel() :].tolist() if t != ids["pad_token_id"]]
    return encoder.tokenizer.decode(new, skip_special_tokens=False).strip()


def test_cli_predict_answers_with_the_training_positions(setup, tmp_path):
    """``clinkd predict`` on a model trained with MCG-RoPE gap 2 (recorded in its folder, as ``clinkd
    train`` records it; no --patch): every answer equals greedy full forwards fed gap-2 positions."""
    from transformers import AutoModelForImageTextToText

    folder, test, processor, model, _, patch = setup
    assert patch["mcg_rope"]["modality_gap"] == 2
    spread = copy.deepcopy(model)  # spread logits: no greedy step hinges on a rounding tie
    special = special_token_ids(processor.tokenizer)
    vision_ids = [
        special[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    ]
    with torch.no_grad():
        for name, param in spread.named_parameters():
            if param.dim() > 1 and "visual" not in name:
                param.normal_(0.0, 0.3)
        spread.get_output_embeddings().weight[vision_ids] = 0.0  # never generated: a logit of 0 is never the max
    saved = tmp_path / "model"
    spread.save_pretrained(saved)
    processor.save_pretrained(saved)
    write_patch_record(saved, patch)
    out = tmp_path / "p.jsonl"
    assert (
        main(
            [
                "predict",
                "--model",
                str(saved),
                "--data",
                str(test),
                "--out",
                str(out),
                "--batch-size",
                "4",
                "--max-new-tokens",
                "6",
                "--no-progress",
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in out.read_text().splitlines()]

    stock = AutoModelForImageTextToText.from_pretrained(saved).eval()
    encoder = SampleEncoder(processor, max_length=2048)
    records = load_records(test)
    want = [_greedy_reference(stock, encoder, r, turn, 6, gap=2) for r in records for turn in range(len(r.turns))]
    assert [x["response"] for x in lines] == want


def test_cli_predict_refuses_other_positions_than_trained(setup, tmp_path, capsys):
    folder, test, processor, model, _, patch = setup
    saved = tmp_path / "model"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    write_patch_record(saved, patch)
    capsys.readouterr()
    args = ["predict", "--model", str(saved), "--data", str(test), "--out", str(tmp_path / "o.jsonl")]
    for other in ("null", '{"mcg_rope": null}', '{"mcg_rope": {"modality_gap": 3}}'):
        assert main(args + ["--patch", other]) == 2
        err = capsys.readouterr().err
        assert "trained with position indices MCG-RoPE gap 2, stride 1" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()
    assert load_model(str(saved), patch={"mcg_rope": {"modality_gap": 2}, "attention": False}) is not None
    (saved / "clinkd_patch.json").write_text("{oops")
    assert main(args) == 2 and "clinkd_patch.json is not valid JSON" in capsys.readouterr().err
