"""Greedy, batched answers of a Qwen2-VL model to every question of each record → predictions JSONL.

    predict(model, processor, "test.jsonl", "preds.jsonl", batch_size=8, max_new_tokens=64)

Question t of a multi-turn record is asked after the reference answers of questions 0..t-1 (teacher
forcing, so one wrong answer does not derail the later turns). Each output line: {"id", "turn", "task",
"modality", "question", "annotation" (the reference answer), "response" (the decoded generation,
special tokens kept as text)} — what ``clinkd eval`` reads.
Prompts are left-padded so a batch generates together; the data file is checked (every record, every
image) before the model runs, so bad input fails with ``file:line`` before any compute.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from clinkd.io import write_text_atomic

from ..data.encode import SampleEncoder
from ..data.offline_processor import special_token_ids
from ..data.records import load_records


def _batch(prompts: list[dict], pad_id: int, image_token_id: int) -> dict:
    """Left-pad input_ids [B, Lmax] + attention_mask + mm_token_type_ids (1 on image placeholders, what a
    Qwen2-VL processor returns: transformers needs it for 3-D positions in generate()); concatenate
    pixel_values, stack image_grid_thw."""
    longest = max(p["input_ids"].numel() for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, p in enumerate(prompts):
        n = p["input_ids"].numel()
        ids[row, longest - n :] = p["input_ids"]
        mask[row, longest - n :] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": ((ids == image_token_id) & (mask == 1)).long(),
        "pixel_values": torch.cat([p["pixel_values"] for p in prompts]),
        "image_grid_thw": torch.cat([p["image_grid_thw"] for p in prompts]),
    }


def decode_answer(row: list[int], tokenizer, eos_id: int, pad_id: int) -> tuple[str, int]:
    """A generated row → (its text up to the first eos, special tokens kept as text; the number of tokens
    generated, the eos included)."""
    length = row.index(eos_id) + 1 if eos_id in row else len(row)
    kept = [t for t in row[:length] if t not in (eos_id, pad_id)]
    return tokenizer.decode(kept, skip_special_tokens=False).strip(), length - row[:length].count(pad_id)


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: list[dict],
    *,
    max_new_tokens: int,
    num_return_sequences: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> tuple[list[list[str]], int]:
    """One batched ``model.generate`` (KV cache) over ``prompts`` (``SampleEncoder.encode_prompt`` dicts):
    ([[text] * num_return_sequences per prompt], generated token count). Greedy unless ``do_sample``;
    the caller seeds torch's generator for sampling. The model's dtype and device are used."""
    ids = special_token_ids(tokenizer)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = _batch(prompts, ids["pad_token_id"], ids["image_token_id"])
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    sampling = (
        dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        if do_sample
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    )
    generated = model.generate(
        **batch,
        **sampling,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_return_sequences,
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
    )
    new = generated[:, batch["input_ids"].shape[1] :].tolist()
    texts, tokens = [], 0
    for row in new:
        text, count = decode_answer(row, tokenizer, ids["eos_token_id"], ids["pad_token_id"])
        texts.append(text)
        tokens += count
    n = num_return_sequences
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))], tokens


def predict(
    model,
    processor,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    root=None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_length: int = 2048,
    progress: bool = True,
) -> int:
    """Write ``out`` (JSONL, atomically) with one greedy answer per question of ``data``; returns the count.

    model: a Qwen2-VL ``*ForConditionalGeneration`` (patched or not; its dtype and device are used);
    processor: the tokenizer + image processor it was trained with."""
    from tqdm.auto import tqdm

    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    records = load_records(data, root=root, check_images=True)  # every record and image checked there
    encoder = SampleEncoder(processor, max_length=max_length)
    was_training = model.training
    model.eval()
    questions = [(record, turn) for record in records for turn in range(len(record.turns))]
    lines = []
    try:
        for start in tqdm(range(0, len(questions), batch_size), desc="predict", disable=not progress):
            chunk = questions[start : start + batch_size]
            texts, _ = generate_texts(
                model,
                processor.tokenizer,
                [encoder.encode_prompt(r, turn) for r, turn in chunk],
                max_new_tokens=max_new_tokens,
            )
            for (record, turn), (response,) in zip(chunk, texts):
                lines.append(
                    {
                        "id": record.id,
                        "turn": turn,
                        "task": record.task,
                        "modality": record.modality,
                        "question": record.turns[turn][0],
                        "annotation": record.turns[turn][1],
                        "response": response,
                    }
                )
    finally:
        model.train(was_training)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(json.dumps(line) + "\n" for line in lines))
    return len(lines)


SAVED = "saved"  # load_model's default patch: the one recorded beside the weights


def load_model(path: str, *, patch: dict | None | str = SAVED, dtype: str = "float32", device: str = "cpu"):
    """A saved model (``AutoModelForImageTextToText.from_pretrained``), patched like it was trained.

    patch: the keyword arguments of ``clinkd.patch.patch_qwen2_vl`` (e.g. {"mcg_rope": {...}}), None for
    no patch, or SAVED (default): what ``clinkd train`` recorded in the folder (``clinkd_patch.json``;
    no patch where nothing is recorded). A given patch whose position indices differ from the recorded
    ones is a ValueError: the model would answer with positions it was not trained on."""
    from transformers import AutoModelForImageTextToText

    from clinkd.patch.record import patch_positions, read_patch_record

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    if not Path(path, "config.json").is_file():
        if Path(path, "adapter_config.json").is_file():  # a LoRA stage's adapter folder (clinkd.train.lora)
            final = Path(path).parent / "final"
            where = f"; its stage's merged model is {final}" if (final / "config.json").is_file() else ""
            raise ValueError(
                f"{path} holds a LoRA adapter (PEFT), not a model: give the stage's final folder, which "
                f"holds the adapter merged into the weights{where}"
            )
        raise ValueError(f"model folder {path} has no config.json")
    recorded = read_patch_record(path)
    if isinstance(patch, str):
        if patch != SAVED:
            raise ValueError(f"patch must be a dict, None or {SAVED!r}, got {patch!r}")
        patch = recorded.get("patch")
    elif recorded and patch_positions(patch) != patch_positions(recorded["patch"]):
        raise ValueError(
            f"{path} was trained with position indices {patch_positions(recorded['patch'])}, the "
            f"patch asks for {patch_positions(patch)}; leave the patch out to use the recorded one"
        )
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtypes[dtype]).to(device)
    if patch is not None:
        from clinkd.patch import patch_qwen2_vl

        model = patch_qwen2_vl(model, **patch)
    return model
