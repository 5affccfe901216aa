"""clinkd: the ClinKD model layer (Hugging Face Qwen2-VL patching, trainer, data, CLI) on clinkd_kernels.

The public names below are imported on first use, so ``import clinkd`` (and ``clinkd --help``) import
neither transformers nor torch.
"""

__version__ = "0.1.0"

from ._lazy import lazy_exports

__getattr__, __dir__, _exported = lazy_exports(__name__, {
    "clinkd.data": ("ClinKDDataset", "DataError", "Qwen2VLCollator", "SampleEncoder", "build_dataset",
                    "build_offline_processor", "load_processor", "load_records"),
    "clinkd.distill": ("PseudoLabelStore", "StoreError", "StoreMeta", "cache_pseudo_labels"),
    "clinkd.train": ("ClinKDTrainer", "ConfigError", "KDSettings", "MarginCurriculum", "load_config", "prepare_run",
                     "register_preset", "run_training"),
    "clinkd.patch": ("final_hidden_states", "patch_qwen2_vl", "patch_qwen2_vl_classes", "unpatch_qwen2_vl",
                     "unpatch_qwen2_vl_classes"),
})
__all__ = _exported
