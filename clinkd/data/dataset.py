"""A torch Dataset of encoded records, checked as a whole before any training starts."""

from __future__ import annotations

import os

import torch

from .encode import SampleEncoder
from .records import DataError, Record, load_records

MAX_REPORTED = 10  # problems listed in one DataError


class ClinKDDataset(torch.utils.data.Dataset):
    """records → ``SampleEncoder.encode`` dicts, each with ``sample_index`` (its position, int).

    ``ids[i]`` is the id of sample i (the key of the pseudo-label store).
    """

    def __init__(self, records: list[Record], encoder: SampleEncoder):
        self.records = list(records)
        self.encoder = encoder
        self.ids = [r.id for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        sample = self.encoder.encode(self.records[index])
        sample["sample_index"] = index
        return sample

    def validate(self, *, progress: bool = False) -> list[int]:
        """Run every check ``encode`` makes (image readable, placeholders fit, supervised tokens left)
        without decoding pixels; returns the sequence lengths. DataError lists up to 10 bad records
        (on one line, separated by "; ")."""
        from tqdm.auto import tqdm

        lengths, problems = [], []
        for record in tqdm(self.records, desc="checking data", unit="record", disable=not progress):
            try:
                lengths.append(self.encoder.check(record))
            except DataError as e:
                problems.append(str(e))
        if problems:  # one line (the command line prints it as it is), each problem naming its file:line
            more = f"; ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
            raise DataError(
                f"{len(problems)} of {len(self.records)} records cannot be used: "
                + "; ".join(problems[:MAX_REPORTED])
                + more
            )
        return lengths


def build_dataset(
    path: str | os.PathLike,
    processor,
    *,
    root: str | os.PathLike | None = None,
    max_length: int = 2048,
    validate: bool = True,
    progress: bool = False,
) -> ClinKDDataset:
    """Load, normalise and (by default) fully check a Med-GRIT/ShareGPT data file (see ``records``)."""
    records = load_records(path, root=root, check_images=validate)
    dataset = ClinKDDataset(records, SampleEncoder(processor, max_length=max_length))
    if validate:
        dataset.validate(progress=progress)
    return dataset
