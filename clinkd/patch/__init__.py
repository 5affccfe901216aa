"""Hugging Face Qwen2-VL / Qwen2.5-VL on clinkd kernels: MCG-RoPE positions, fused attention, fused loss.

    from clinkd import patch_qwen2_vl
    model = patch_qwen2_vl(model)                        # gap 2, stride 1, fused attention and loss
    model = patch_qwen2_vl(model, mcg_rope=None)         # stock positions, fused kernels only

    patch_qwen2_vl_classes("Qwen2-VL")                   # before from_pretrained: every new model
    model = Qwen2VLForConditionalGeneration.from_pretrained(...)

Parts: ``positions`` (get_rope_index → mcg_rope_index), ``attention`` (decoder attention →
mcg_rope_attention), ``loss`` (causal-LM loss → linear_kd_loss), ``head`` (the lm_head's full weight under
ZeRO-3 and FSDP2), ``record`` (the patch recorded beside saved weights), ``api`` (applying and undoing).
"""

from ._compat import SUPPORTED_TRANSFORMERS, check_transformers_version
from .api import (
    PatchSettings,
    apply_to_transformers,
    check_patchable,
    patch_qwen2_vl,
    patch_qwen2_vl_classes,
    patch_settings,
    revert_transformers,
    unpatch_qwen2_vl,
    unpatch_qwen2_vl_classes,
)
from .attention import MRopePositions
from .head import call_in_forward, check_full_weight
from .loss import final_hidden_states, lm_head_operands, next_token_targets
from .positions import MCGRope
from .spec import PatchSpec, patch_spec

__all__ = [
    "MCGRope",
    "MRopePositions",
    "PatchSettings",
    "PatchSpec",
    "SUPPORTED_TRANSFORMERS",
    "apply_to_transformers",
    "call_in_forward",
    "check_full_weight",
    "check_patchable",
    "patch_spec",
    "check_transformers_version",
    "final_hidden_states",
    "lm_head_operands",
    "next_token_targets",
    "patch_qwen2_vl",
    "patch_qwen2_vl_classes",
    "patch_settings",
    "revert_transformers",
    "unpatch_qwen2_vl",
    "unpatch_qwen2_vl_classes",
]
