"""Data for ClinKD training: Med-GRIT/ShareGPT records → Qwen2-VL batches with masked labels.

* ``records``: reading and checking records (tasks, modalities, boxes, image paths inside the data root):
  ``load_records`` makes every record check, for every command that reads records.
* ``paths``: checks of files to read (regular files only: a FIFO is never opened) and folders to write.
* ``encode``: chat template, image placeholders, label masking (``SampleEncoder``).
* ``dataset``: ``ClinKDDataset`` / ``build_dataset`` (checks every record before training).
* ``collate``: padded or packed batches (``Qwen2VLCollator``), packed position ids.
* ``offline_processor``: a Qwen2-VL processor built without downloads (tests, demo, tiny runs).

The names below are imported on first use (``records`` needs neither torch nor transformers).
"""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        ".collate": ("Qwen2VLCollator", "model_inputs", "packed_position_ids"),
        ".dataset": ("ClinKDDataset", "build_dataset"),
        ".encode": ("SampleEncoder",),
        ".offline_processor": (
            "build_offline_processor",
            "build_offline_tokenizer",
            "load_processor",
            "special_token_ids",
            "tokenizer_fingerprint",
        ),
        ".records": (
            "MODALITIES",
            "TASKS",
            "DataError",
            "Record",
            "infer_task",
            "load_records",
            "normalise_boxes",
            "parse_boxes",
        ),
    },
)
