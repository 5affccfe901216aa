"""LoRA training of the student through PEFT (a stage with ``lora`` settings, ``LoraSpec``).

    model = wrap_lora(student, spec, base="runs/x/kd/final")   # student patched first, then PEFT's LoRA layers
    trainer = ClinKDTrainer(model=model, ...); trainer.train()
    student = save_lora_stage(trainer, stage_dir / "final", stage_dir / "adapter", patch=...)

The student is patched (``clinkd.patch_qwen2_vl``) before it is wrapped: the patched attention calls
``self.q_proj(hidden)`` and so on, which PEFT has replaced by LoRA layers, and the fused loss reads the
frozen ``lm_head.weight``. Adapters go on the named linear layers of the text decoder only (a regex
anchored at the decoder's module path: Qwen2.5-VL's vision tower also has ``gate_proj``/``up_proj``/
``down_proj`` layers, which a plain name list would match). Every other weight is frozen.

After training a stage keeps two folders, each written beside its place and renamed into it (saved
whole or not at all):

    <stage>/adapter/   PEFT's ``save_pretrained``: adapter_config.json, adapter_model.safetensors (and the
                       processor); ``PeftModel.from_pretrained(base, folder)`` on the model the stage
                       started from (its ``base_model_name_or_path``: the previous stage's final, or
                       ``models.student.from_pretrained``; a ``config`` student's random init is rebuilt
                       from the seed) gives the trained model
    <stage>/final/     the adapter merged into the weights (``merge_and_unload``): a plain model folder,
                       as a full fine-tuning stage writes it, which ``clinkd predict``, ``clinkd eval`` and
                       the next stage load

and the student in memory is the merged model (its frozen weights trainable again), so the next stage
-- LoRA with a fresh adapter, or full fine-tuning -- starts from exactly what ``final`` holds.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from .specs import LoraSpec

MIN_PEFT = "0.18"
_STATE = "clinkd_lora_state"  # on the PeftModel: what wrap_lora changed on the student, for the merge to undo


def peft_problem() -> str | None:
    """Why LoRA training cannot run here (peft missing or older than MIN_PEFT), or None."""
    from importlib import metadata

    from packaging.version import Version

    try:
        version = metadata.version("peft")
        import peft  # noqa: F401
    except (metadata.PackageNotFoundError, ImportError):
        return f"LoRA training needs the peft package (>= {MIN_PEFT}): pip install 'clinkd[peft]'"
    if Version(version) < Version(MIN_PEFT):
        return f"LoRA training needs peft >= {MIN_PEFT}, peft {version} is installed: pip install 'clinkd[peft]'"
    return None


def is_peft_model(model) -> bool:
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def base_of(model):
    """The transformers model inside a PeftModel (the model itself otherwise)."""
    return model.get_base_model() if is_peft_model(model) else model


def decoder_linears(model: nn.Module) -> tuple[str, list[str]]:
    """(the module path of ``model``'s text decoder, the names of the linear layers inside it)."""
    decoder = model.get_decoder()
    prefix = next((name for name, module in model.named_modules() if module is decoder), None)
    if not prefix:
        raise TypeError(f"{type(model).__name__} has no text decoder module under it (not a Qwen-VL model?)")
    names = sorted(
        {name.rsplit(".", 1)[-1] for name, module in decoder.named_modules() if isinstance(module, nn.Linear)}
    )
    return prefix, names


def target_problem(spec: LoraSpec, names: list[str]) -> str | None:
    """What is wrong with ``spec.target_modules`` for a decoder with these linear layer names, or None."""
    unknown = [t for t in spec.target_modules if t not in names]
    if not unknown:
        return None
    verb = "is not a linear layer" if len(unknown) == 1 else "are not linear layers"
    return (
        f"{', '.join(map(repr, unknown))} {verb} of the student's text decoder (its linear layers: {', '.join(names)})"
    )


def target_pattern(prefix: str, targets) -> str:
    """PEFT's ``target_modules`` as a regex (PEFT full-matches it against module paths): the layers named
    ``targets`` anywhere under the decoder at ``prefix``, nothing outside it."""
    return rf"{re.escape(prefix)}\.(?:.+\.)?(?:{'|'.join(re.escape(t) for t in targets)})"


def wrap_lora(model: nn.Module, spec: LoraSpec, *, base: str | os.PathLike | None = None):
    """``model`` (patched already, if at all) with LoRA adapters on its text decoder: a ``peft.PeftModel``
    with only the adapters trainable. ``base``: what the adapter applies to (recorded as the adapter's
    ``base_model_name_or_path``: the folder the stage's student was loaded from; None for a random init)."""
    from peft import LoraConfig, get_peft_model

    if is_peft_model(model):
        raise TypeError("the student is a PeftModel already: give wrap_lora the transformers model")
    prefix, names = decoder_linears(model)
    problem = target_problem(spec, names)
    if problem is not None:
        raise ValueError(f"lora.target_modules: {problem}")
    state = ({name: p.requires_grad for name, p in model.named_parameters()}, hasattr(model, "_require_grads_hook"))
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        use_rslora=spec.rslora,
        target_modules=target_pattern(prefix, spec.target_modules),
        bias="none",
    )
    wrapped = get_peft_model(model, config)
    wrapped.peft_config["default"].base_model_name_or_path = None if base is None else str(base)
    setattr(wrapped, _STATE, state)
    return wrapped


def merge_lora(wrapped) -> nn.Module:
    """The adapters merged into the weights (in place): the transformers model, with the trainable flags
    and input hooks it had before ``wrap_lora``."""
    trainable, had_hook = getattr(wrapped, _STATE)
    merged = wrapped.merge_and_unload(safe_merge=True)  # safe_merge: a non-finite merged weight is an error
    for name, p in merged.named_parameters():
        p.requires_grad_(trainable.get(name, True))
    if not had_hook and hasattr(merged, "_require_grads_hook"):  # added by PEFT for gradient checkpointing
        merged.disable_input_require_grads()
    return merged


def check_engine(trainer, where: str) -> None:
    """LoRA stages merge the adapter into the full weights on every process: not under engines that
    shard the weights (DeepSpeed ZeRO-3, FSDP)."""
    zero3 = False
    if trainer.is_deepspeed_enabled:
        plugin = trainer.accelerator.state.deepspeed_plugin
        zero3 = plugin is not None and plugin.zero_stage == 3
    if zero3 or trainer.is_fsdp_enabled:
        raise RuntimeError(
            f"{where}: LoRA stages cannot run under {'DeepSpeed ZeRO-3' if zero3 else 'FSDP'}: merging "
            "the adapter into the stage's final weights needs the full weights on every process "
            "(use DeepSpeed ZeRO-1/2 or DDP)"
        )


def _replace(staging: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)  # left by an interrupted stage (it has no stage.json)
    os.replace(staging, target)


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)  # left by an interrupted save
    return folder


def save_lora_stage(trainer, final: str | os.PathLike, adapter: str | os.PathLike, *, patch):
    """Save a trained LoRA stage (every process calls it): the adapter into ``adapter`` (PEFT's files and
    the processor), then the merged model into ``final`` (as a full fine-tuning stage saves it, with its
    patch record: ``patch``, a PatchSpec or None); each into a staging folder beside it, renamed into place.
    Returns the merged model."""
    from transformers.trainer import TRAINING_ARGS_NAME

    from .artifacts import write_patch_record

    final, adapter = Path(final), Path(adapter)
    main = trainer.is_world_process_zero()
    wrapped = trainer.accelerator.unwrap_model(trainer.model)
    staging = adapter.with_name(f".{adapter.name}.partial")
    if main:
        _fresh(staging)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # PEFT's save_pretrained: the adapter only
    if main:
        _replace(staging, adapter)
    merged = merge_lora(wrapped)
    if main:
        staging = _fresh(final.with_name(f".{final.name}.partial"))
        merged.save_pretrained(str(staging))
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(str(staging))
        torch.save(trainer.args, staging / TRAINING_ARGS_NAME)
        write_patch_record(staging, patch)
        _replace(staging, final)
    trainer.accelerator.wait_for_everyone()
    return merged
