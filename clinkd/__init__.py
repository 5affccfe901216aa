"""clinkd: the ClinKD model layer (Hugging Face Qwen2-VL patching, trainer, data, CLI) on clinkd_kernels."""

__version__ = "0.1.0"

# Data, pseudo-label store and trainer: imported on first use (the trainer pulls in accelerate).
_LAZY = {name: "clinkd.data" for name in ("ClinKDDataset", "DataError", "Qwen2VLCollator", "SampleEncoder",
                                          "build_dataset", "build_offline_processor", "load_processor",
                                          "load_records")}
_LAZY.update({name: "clinkd.distill" for name in ("PseudoLabelStore", "StoreError", "StoreMeta",
                                                   "cache_pseudo_labels")})
_LAZY.update({name: "clinkd.train" for name in ("ClinKDTrainer", "ConfigError", "KDSettings", "MarginCurriculum",
                                                 "load_config", "prepare_run", "register_preset", "run_training")})
_LAZY.update({name: "clinkd.patch" for name in ("final_hidden_states", "patch_qwen2_vl", "patch_qwen2_vl_classes", "unpatch_qwen2_vl", "unpatch_qwen2_vl_classes")})  # noqa: E501


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clinkd' has no attribute {name!r}")
