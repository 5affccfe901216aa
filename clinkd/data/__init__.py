"""Data for ClinKD training: Med-GRIT/ShareGPT records → Qwen2-VL batches with masked labels.

* ``records``: reading and checking records (tasks, boxes, image paths inside the data root).
* ``encode``: chat template, image placeholders, label masking (``SampleEncoder``).
* ``dataset``: ``ClinKDDataset`` / ``build_dataset`` (checks every record before training).
* ``collate``: padded or packed batches (``Qwen2VLCollator``), packed position ids.
* ``offline_processor``: a Qwen2-VL processor built without downloads (tests, demo, tiny runs).
"""

from .collate import Qwen2VLCollator, model_inputs, packed_position_ids
from .dataset import ClinKDDataset, build_dataset
from .encode import SampleEncoder
from .offline_processor import (build_offline_processor, build_offline_tokenizer, load_processor, special_token_ids,
                                tokenizer_fingerprint)
from .records import MODALITIES, TASKS, DataError, Record, infer_task, load_records, normalise_boxes, parse_boxes

__all__ = ["ClinKDDataset", "DataError", "MODALITIES", "Qwen2VLCollator", "Record", "SampleEncoder", "TASKS",
           "build_dataset", "build_offline_processor", "build_offline_tokenizer", "infer_task", "load_processor",
           "load_records", "model_inputs", "normalise_boxes", "packed_position_ids", "parse_boxes",
           "special_token_ids", "tokenizer_fingerprint"]
