"""Records, label masking, image placeholders, collation (padded and packed)."""

from __future__ import annotations

import json

import pytest
import torch

from clinkd.data import (
    DataError,
    SampleEncoder,
    build_dataset,
    load_records,
    model_inputs,
    normalise_boxes,
    parse_boxes,
    special_token_ids,
)
from clinkd.data.offline_processor import CHAT_TEMPLATE, load_processor, tokenizer_fingerprint
from tests.data import tiny
from tests.numerics import assert_close


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return folder, tiny.make_data(folder, 10, seed=3)


@pytest.fixture(scope="module")
def dataset(data):
    folder, path = data
    return build_dataset(path, tiny.processor(), max_length=512)


def test_records_forms_tasks_and_boxes(data):
    folder, path = data
    records = load_records(path)
    raws = json.loads(path.read_text())
    assert [r.id for r in records] == [raw["id"] for raw in raws]
    for record, raw in zip(records, raws):
        assert record.task == ("VG", "ROC", "RC", "MIA")[raws.index(raw) % 4]  # given or inferred, same answer
        assert record.modality == raw["id"].split("_")[0]
        assert record.image == (folder / f"{raw['id']}.png").resolve()
        question, answer = record.turns[0]
        assert "<img>" not in question and "<box>" not in question + answer and "<box_start>" not in question
        conv = raw["conversations"]
        raw_q, raw_a = (conv[0]["value"], conv[1]["value"]) if isinstance(conv[0], dict) else conv[0]
        assert parse_boxes(question + answer) == parse_boxes(raw_q + raw_a)
    # the pair form and the turn form of the same record normalise identically
    turn = dict(raws[0])
    pairs = dict(turn, conversations=[[turn["conversations"][0]["value"], turn["conversations"][1]["value"]]])
    from clinkd.data.records import parse_record

    assert parse_record(turn, root=folder).turns == parse_record(pairs, root=folder).turns


def test_box_forms():
    text = (
        "a <box>(0.1, 0.2),(0.30,0.4)</box> b <box_start>(0,0),(1,1)<box_end> c <|box_start|>(.5,.5),(.6,.7)<|box_end|>"
    )
    assert parse_boxes(text) == [(0.1, 0.2, 0.3, 0.4), (0.0, 0.0, 1.0, 1.0), (0.5, 0.5, 0.6, 0.7)]
    out = normalise_boxes(text)
    assert out.count("<|box_start|>") == 3 and "<box>" not in out and "<box_start>" not in out
    assert parse_boxes(out) == parse_boxes(text)
    with pytest.raises(DataError, match=r"outside \[0, 1\].*1.2"):
        normalise_boxes("<box>(0.1,0.2),(1.2,0.4)</box>")
    with pytest.raises(DataError, match="not of the form"):
        normalise_boxes("<box>(0.1,0.2)</box>")


def test_labels_mask_everything_but_the_answers(dataset):
    tok = tiny.processor().tokenizer
    for i in range(len(dataset)):
        sample, record = dataset[i], dataset.records[i]
        ids, labels = sample["input_ids"], sample["labels"]
        supervised = labels != -100
        assert torch.equal(labels[supervised], ids[supervised])  # unshifted: label = the token itself
        want = "".join(answer + "<|im_end|>" for _, answer in record.turns)
        assert tok.decode(labels[supervised]) == want
        # supervised tokens are exactly the answer runs: each run ends with <|im_end|>, and the
        # question text never appears in them
        assert int(supervised.sum()) == len(tok(want, add_special_tokens=False)["input_ids"])
        assert tok.decode(ids[~supervised]).count("<|im_start|>assistant") == len(record.turns)


def test_image_placeholders_match_the_grid(dataset):
    ids = special_token_ids(tiny.processor().tokenizer)
    for i in range(len(dataset)):
        sample = dataset[i]
        grid = sample["image_grid_thw"]
        t, h, w = grid[0].tolist()
        count = int((sample["input_ids"] == ids["image_token_id"]).sum())
        assert count == t * h * w // tiny.MERGE**2 and count > 0
        assert sample["pixel_values"].shape == (t * h * w, 3 * tiny.TEMPORAL * tiny.PATCH**2)
        # the run is contiguous, between vision_start and vision_end
        where = (sample["input_ids"] == ids["image_token_id"]).nonzero().squeeze(1)
        assert int(where[-1] - where[0]) + 1 == count
        assert int(sample["input_ids"][where[0] - 1]) == ids["vision_start_token_id"]
        assert int(sample["input_ids"][where[-1] + 1]) == ids["vision_end_token_id"]
        # the header-only count (used to check data before training) agrees with the pixels
        assert dataset.encoder.check(dataset.records[i]) == sample["input_ids"].numel()


def test_prompt_for_generation_is_the_training_prefix(dataset):
    for i in (0, 5):
        sample, prompt = dataset[i], dataset.encoder.encode_prompt(dataset.records[i])
        n = prompt["input_ids"].numel()
        assert torch.equal(prompt["input_ids"], sample["input_ids"][:n])
        assert bool((sample["labels"][:n] == -100).all()) and int(sample["labels"][n]) != -100
        assert torch.equal(prompt["pixel_values"], sample["pixel_values"])


def test_prompt_for_a_later_turn_is_the_training_prefix(dataset):
    """Turn 1 of a two-turn record: its prompt is the training sequence up to the second answer (the
    first answer given as history), and that answer is the next supervised token."""
    import dataclasses

    record = dataset.records[2]
    two = dataclasses.replace(record, turns=list(record.turns) + [("And its size?", "small")])
    sample = dataset.encoder.encode(two)
    prompt = dataset.encoder.encode_prompt(two, turn=1)
    n = prompt["input_ids"].numel()
    first = dataset.encoder.encode_prompt(two, turn=0)["input_ids"].numel()
    assert n > first and torch.equal(prompt["input_ids"], sample["input_ids"][:n])
    assert int(sample["labels"][n - 1]) == -100 and int(sample["labels"][n]) != -100
    assert int((sample["labels"][first:n] != -100).sum()) > 0  # the first answer is inside the prefix
    with pytest.raises(ValueError, match="turn 2 is out of range"):
        dataset.encoder.encode_prompt(two, turn=2)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch(dataset, side):
    samples = [dataset[i] for i in (0, 3, 5)]
    batch = tiny.collator(padding_side=side, pad_to_multiple_of=8)([dict(s) for s in samples])
    assert batch["input_ids"].shape[1] % 8 == 0
    for b, s in enumerate(samples):
        n = s["input_ids"].numel()
        cols = slice(0, n) if side == "right" else slice(batch["input_ids"].shape[1] - n, None)
        assert torch.equal(batch["input_ids"][b, cols], s["input_ids"])
        assert torch.equal(batch["labels"][b, cols], s["labels"])
        assert int(batch["attention_mask"][b].sum()) == n
        assert bool((batch["labels"][b][batch["attention_mask"][b] == 0] == -100).all())
    assert torch.equal(batch["image_grid_thw"], torch.cat([s["image_grid_thw"] for s in samples]))
    assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for s in samples]))
    assert batch["sample_index"].tolist() == [0, 3, 5]


@pytest.mark.parametrize("mcg", [False, True])
def test_packed_batch_gives_the_padded_loss(dataset, mcg):
    """One packed row (per-sample positions, no attention across samples) = the padded batch."""
    model = tiny.model(len(tiny.processor().tokenizer)).eval()
    if mcg:
        from clinkd.patch import patch_qwen2_vl

        patch_qwen2_vl(model, attention=False, backend="torch")
    samples = [dataset[i] for i in (1, 2, 6)]
    padded = tiny.collator()(samples)
    packed = tiny.collator(packing=True)(samples)
    assert packed["input_ids"].shape == (1, sum(s["input_ids"].numel() for s in samples))
    with torch.no_grad():
        ref = (
            model.double()(**model_inputs(model, padded), return_logits=True).logits
            if mcg
            else model.double()(**model_inputs(model, padded)).logits
        )
        a = model.float()(**model_inputs(model, padded)).loss
        b = model(**model_inputs(model, packed)).loss
    # token logits of each sample agree (the loss depends on nothing else)
    with torch.no_grad():
        lp = model(**{**model_inputs(model, packed), "labels": None}).logits[0]
    start = 0
    for row, s in enumerate(samples):
        n = s["input_ids"].numel()
        assert_close(
            f"packed logits of sample {row}",
            lp[start : start + n],
            ref[row, :n].double(),
            baseline=None,
            atol=2e-5,
            norm_tol=1e-5,
        )
        start += n
    assert_close("packed loss", b, a.double(), atol=2e-5)


def test_encoder_and_path_errors(data, tmp_path):
    folder, path = data
    raws = json.loads(path.read_text())
    cases = {
        "outside the data root": dict(raws[0], image="../../etc/passwd"),
        "unknown task": dict(raws[0], task="SEG"),
        "does not exist": dict(raws[0], id="ct_9999_missing"),
        r"outside \[0, 1\]": dict(raws[0], conversations=[["q", "<box>(0.1,0.2),(0.3,1.5)</box>"]]),
        "breaks the human/gpt alternation": dict(raws[0], conversations=[{"from": "gpt", "value": "a"}]),
        "no string 'id'": {"conversations": [["q", "a"]]},
        "repeats the record": None,
    }
    for message, raw in cases.items():
        records = [raws[1], raws[1]] if raw is None else [raw]
        bad = tmp_path / "bad.jsonl"
        bad.write_text("".join(json.dumps(r) + "\n" for r in records))
        with pytest.raises(DataError, match=message):
            load_records(bad, root=folder)
    bad.write_text('{"id": "x_1"}\n{broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_records(bad, root=folder)
    with pytest.raises(ValueError, match="max_length"):
        SampleEncoder(tiny.processor(), max_length=0)


def test_truncation_that_leaves_no_answer_is_an_error(data):
    folder, path = data
    records = load_records(path)
    encoder = SampleEncoder(tiny.processor(), max_length=512)
    length = encoder.check(records[2])
    answer = len(tiny.processor().tokenizer(records[2].turns[0][1] + "<|im_end|>")["input_ids"])
    short = SampleEncoder(tiny.processor(), max_length=length - answer - 2)  # cut right after the prompt
    with pytest.raises(DataError, match="no supervised"):
        short.check(records[2])
    tiny_budget = SampleEncoder(tiny.processor(), max_length=12)
    with pytest.raises(DataError, match="cuts into the image"):
        tiny_budget.check(records[2])


def test_offline_processor_round_trip(tmp_path):
    processor = tiny.processor()
    processor.save_pretrained(str(tmp_path))
    again = load_processor(str(tmp_path))
    assert tokenizer_fingerprint(again.tokenizer) == tokenizer_fingerprint(processor.tokenizer)
    assert again.chat_template == CHAT_TEMPLATE
    assert again.image_processor.patch_size == tiny.PATCH and again.image_processor.merge_size == tiny.MERGE
    ids = special_token_ids(again.tokenizer)
    assert len(set(ids.values())) == len(ids)
    with pytest.raises(ValueError, match="images and text only"):
        again(text=["x"], videos=[torch.zeros(1, 3, 8, 8)])
