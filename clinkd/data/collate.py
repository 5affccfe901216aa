"""Batches for Qwen2-VL: padded rows, or every sample packed into one row.

Padded batch (B samples, S = longest, rounded up to ``pad_to_multiple_of``):
    input_ids [B,S] (pad_token_id), attention_mask [B,S] (1 = token), labels [B,S] (ignore_index on
    padding), mm_token_type_ids [B,S] (1 on image placeholders), pixel_values [ΣP, D] and
    image_grid_thw [n_images, 3] in sample order, sample_index [B].
Packed batch: the same keys with B = 1 and S = Σ L_b, no attention_mask, plus packed_lengths [B] and
    packed_images [B] (images per sample). A packed row needs per-sample position ids, which depend
    on the model's rope settings: ``packed_position_ids(model, batch)`` computes them (the trainer does).
Sample b's supervised next-token rows come, in both forms, in the same order (sample by sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Qwen2VLCollator:
    """Collate ``ClinKDDataset`` samples (see the module docstring for the keys)."""

    pad_token_id: int
    image_token_id: int
    ignore_index: int = -100
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    packing: bool = False

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.pad_to_multiple_of is not None and (
            not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1
        ):
            raise ValueError(f"pad_to_multiple_of must be an int >= 1 or None, got {self.pad_to_multiple_of!r}")

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        vision = {}
        grids = [s["image_grid_thw"] for s in samples if s.get("image_grid_thw") is not None]
        if grids:
            vision["pixel_values"] = torch.cat(
                [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
            )
            vision["image_grid_thw"] = torch.cat(grids)
        index = torch.tensor([int(s.get("sample_index", -1)) for s in samples], dtype=torch.long)
        if self.packing:
            input_ids = torch.cat([s["input_ids"] for s in samples])[None]
            labels = torch.cat([s["labels"] for s in samples])[None]
            images = [0 if s.get("image_grid_thw") is None else s["image_grid_thw"].shape[0] for s in samples]
            return {
                "input_ids": input_ids,
                "labels": labels,
                "mm_token_type_ids": (input_ids == self.image_token_id).long(),
                **vision,
                "sample_index": index,
                "packed_lengths": torch.tensor([s["input_ids"].numel() for s in samples], dtype=torch.long),
                "packed_images": torch.tensor(images, dtype=torch.long),
            }

        longest = max(s["input_ids"].numel() for s in samples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(samples)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), self.ignore_index, dtype=torch.long)
        mask = torch.zeros(batch, longest, dtype=torch.long)
        for b, s in enumerate(samples):
            n = s["input_ids"].numel()
            cols = slice(0, n) if self.padding_side == "right" else slice(longest - n, longest)
            input_ids[b, cols] = s["input_ids"]
            labels[b, cols] = s["labels"]
            mask[b, cols] = 1
        mm = ((input_ids == self.image_token_id) & (mask == 1)).long()
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            "mm_token_type_ids": mm,
            **vision,
            "sample_index": index,
        }


def rope_index_owner(model):
    """The module holding ``get_rope_index`` (``Qwen2VLModel``) of a ``*ForConditionalGeneration`` model."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "get_rope_index"):
        return inner
    if hasattr(model, "get_rope_index"):
        return model
    raise TypeError(f"{type(model).__name__} has no get_rope_index (not a Qwen2-VL model?)")


def packed_position_ids(model, batch: dict) -> torch.Tensor:
    """Position ids [4, 1, T] for a packed batch: row 0 the text positions restarting at 0 per sample
    (transformers derives the per-sample attention blocks from it), rows 1..3 the (t, h, w) positions
    that ``model``'s own ``get_rope_index`` (stock or MCG-RoPE) gives each sample alone."""
    owner = rope_index_owner(model)
    input_ids = batch["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError(f"a packed batch has one row, got input_ids of shape {list(input_ids.shape)}")
    lengths = batch["packed_lengths"].tolist()
    images = batch["packed_images"].tolist()
    if sum(lengths) != input_ids.shape[1] or len(images) != len(lengths):
        raise ValueError(
            f"packed_lengths {lengths} / packed_images {images} do not describe {input_ids.shape[1]} tokens"
        )
    grids = batch.get("image_grid_thw")
    parts, start, first_image = [], 0, 0
    for length, count in zip(lengths, images):
        ids = input_ids[:, start : start + length]
        text = torch.arange(length, device=input_ids.device).view(1, 1, length)
        if count:
            grid = grids[first_image : first_image + count]
            mm = batch["mm_token_type_ids"][:, start : start + length]
            pos, _ = owner.get_rope_index(
                ids, image_grid_thw=grid, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm
            )
            pos = pos.to(input_ids.device)
        else:
            pos = text.expand(3, 1, length)
        parts.append(torch.cat([text, pos], dim=0))
        start += length
        first_image += count
    return torch.cat(parts, dim=2)


BATCH_ONLY_KEYS = ("sample_index", "packed_lengths", "packed_images")


def model_inputs(model, batch: dict) -> dict:
    """A collated batch → keyword arguments for ``model`` (labels kept): the bookkeeping keys dropped,
    and for a packed batch the position ids ``model``'s rope settings give (``packed_position_ids``)."""
    inputs = {key: value for key, value in batch.items() if key not in BATCH_ONLY_KEYS}
    if "packed_lengths" in batch:
        inputs["position_ids"] = packed_position_ids(model, batch)
        inputs["use_cache"] = False  # transformers only derives per-sample attention blocks without a cache
    return inputs
