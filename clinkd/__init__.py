"""clinkd: the ClinKD model layer (Hugging Face Qwen2-VL patching, trainer, data, CLI) on clinkd_kernels."""

__version__ = "0.1.0"
