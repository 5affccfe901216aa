"""ClinKD training: pseudo-label KD stage with the confidence-margin curriculum, then SFT.

* ``config``: the YAML run schema (``load_config``, ``parse_config``, ``RunConfig``, ``ConfigError``).
* ``presets``: named configs (``register_preset``, ``get_preset``, ``preset_names``).
* ``curriculum``: ``MarginCurriculum`` / ``margin_weights`` (the rule is in its docstring).
* ``trainer``: ``ClinKDTrainer`` (a transformers Trainer) and ``KDSettings``.
* ``run``: ``prepare_run`` (every check before training) and ``run_training`` (stages, resume).
* ``lora``: LoRA stages through PEFT (``wrap_lora``, ``save_lora_stage``; the config key ``lora``).
* ``cli``: the ``clinkd train / check / distill / presets`` commands.

The names below are imported on first use (the trainer pulls in transformers and accelerate).
"""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".errors": ("ConfigError",),
    ".config": ("LoraSpec", "RunConfig", "StageSpec", "load_config", "parse_config"),
    ".curriculum": ("MarginCurriculum", "margin_weights"),
    ".presets": ("describe_presets", "get_preset", "preset_names", "register_preset"),
    ".run": ("PreparedRun", "build_model", "ensure_store", "prepare_run", "run_training"),
    ".trainer": ("ClinKDTrainer", "KDSettings"),
})
