"""The models of a run: their transformers configs (no weights) and the models themselves, patched.

cfg = model_config(config.student, processor.tokenizer, "config.models.student")
model = build_model(config.student, cfg, seed=config.seed)
"""

from __future__ import annotations

import json

import torch

from ..data.offline_processor import special_token_ids
from .errors import ConfigError
from .specs import ModelSpec

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

try:  # what transformers' configs raise for a field of the wrong type
    from huggingface_hub.errors import StrictDataclassError as _StrictDataclassError
except ImportError:  # an older huggingface_hub: configs raise TypeError / ValueError
    _StrictDataclassError = ValueError


def vocab_size(cfg) -> int:
    """The vocabulary size of a model config (its text config's, for a vision-language one)."""
    return int(getattr(cfg, "text_config", cfg).vocab_size)


def model_config(spec: ModelSpec, tokenizer, where: str):
    """The transformers config of a model spec (no weights). A ``config`` mapping gets the tokenizer's
    vocabulary size and Qwen2-VL special token ids where it does not set them."""
    from transformers import AutoConfig

    if spec.from_pretrained is not None:
        try:
            return AutoConfig.from_pretrained(spec.from_pretrained)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}: cannot load a config from {spec.from_pretrained!r}: {e}") from None
    mapping = json.loads(json.dumps(spec.config))
    model_type = mapping.pop("model_type", "qwen2_vl")
    ids = special_token_ids(tokenizer)
    for key in ("text_config", "vision_config"):
        if mapping.get(key) is not None and not isinstance(mapping[key], dict):
            raise ConfigError(f"{where}.config.{key} must be a mapping of config fields, got {mapping[key]!r:.80}")
    text = mapping.setdefault("text_config", {})
    text.setdefault("vocab_size", len(tokenizer))
    text.setdefault("pad_token_id", ids["pad_token_id"])
    text.setdefault("eos_token_id", ids["eos_token_id"])
    text.setdefault("bos_token_id", None)
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        mapping.setdefault(key, ids[key])
    try:
        return AutoConfig.for_model(model_type, **mapping)
    except (TypeError, ValueError, KeyError, _StrictDataclassError) as e:  # the last: a field of the wrong type
        message = " ".join(str(e).split())
        raise ConfigError(f"{where}.config is not a valid {model_type} config: {message}") from None


def build_model(spec: ModelSpec, cfg, *, seed: int):
    """Load (from_pretrained) or randomly initialise (config, seeded) a model, then apply its patch."""
    from transformers import AutoModelForImageTextToText, set_seed

    dtype = TORCH_DTYPES[spec.dtype]
    if spec.from_pretrained is not None:
        model = AutoModelForImageTextToText.from_pretrained(spec.from_pretrained, dtype=dtype)
    else:
        set_seed(seed)
        model = AutoModelForImageTextToText.from_config(cfg).to(dtype)
    if spec.patch is not None:
        from clinkd.patch import patch_qwen2_vl

        try:
            model = patch_qwen2_vl(model, **spec.patch.options())
        except (TypeError, ValueError) as e:
            raise ConfigError(f"cannot patch {spec.model_id()}: {e}") from None
    return model


__all__ = ["TORCH_DTYPES", "build_model", "model_config", "vocab_size"]
