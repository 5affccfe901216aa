"""clinkd: the ClinKD model layer (Hugging Face Qwen2-VL patching, trainer, data, CLI) on clinkd_kernels.

Needs the ``hf`` extra (transformers and friends): ``pip install 'clinkd[hf]'``. The kernels alone
(``clinkd_kernels``) need only torch, triton and numpy. The public names below are imported on first
use, so ``import clinkd`` (and ``clinkd --help``) import neither transformers nor torch.
"""

import importlib.util as _util

__version__ = "0.1.0"

# import name → distribution of what the model layer needs beyond the kernels (the ``hf`` extra)
_HF_MODULES = {
    "transformers": "transformers",
    "accelerate": "accelerate",
    "safetensors": "safetensors",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "tqdm": "tqdm",
}
_missing = [dist for module, dist in _HF_MODULES.items() if _util.find_spec(module) is None]
if _missing:
    raise ImportError(
        f"clinkd (the model layer) needs {', '.join(_missing)}, which are not installed: "
        "pip install 'clinkd[hf]' (the kernels alone need no extra: import clinkd_kernels)"
    )
del _missing

from ._lazy import lazy_exports  # noqa: E402

__getattr__, __dir__, _exported = lazy_exports(
    __name__,
    {
        "clinkd.data": (
            "ClinKDDataset",
            "DataError",
            "Qwen2VLCollator",
            "SampleEncoder",
            "build_dataset",
            "build_offline_processor",
            "load_processor",
            "load_records",
        ),
        "clinkd.distill": ("PseudoLabelStore", "PseudoLabelWriter", "StoreError", "StoreMeta", "cache_pseudo_labels"),
        "clinkd.train": (
            "ClinKDTrainer",
            "ConfigError",
            "KDSettings",
            "MarginCurriculum",
            "load_config",
            "prepare_run",
            "register_preset",
            "run_training",
        ),
        "clinkd.patch": (
            "MCGRope",
            "apply_to_transformers",
            "final_hidden_states",
            "next_token_targets",
            "patch_qwen2_vl",
            "patch_qwen2_vl_classes",
            "revert_transformers",
            "patch_settings",
            "unpatch_qwen2_vl",
            "unpatch_qwen2_vl_classes",
        ),
    },
)
__all__ = _exported
