"""ClinKD training: pseudo-label KD stage with the confidence-margin curriculum, then SFT.

* ``config``: the YAML run schema (``load_config``, ``parse_config``, ``ConfigError``); its sections'
  keys and types are pydantic models (``schema``), each section becomes its typed spec (``sections``).
* ``specs``: the typed config (``RunConfig``, ``ModelSpec``, ``StageSpec``: ``KDStage``, ``SFTStage``,
  ``RCTStage``; ``KDSettings``, the KD term a ``KDStage`` is).
* ``presets``: named configs (``register_preset``, ``get_preset``, ``preset_names``).
* ``curriculum``: ``MarginCurriculum`` / ``margin_weights`` (the rule is in its docstring).
* ``trainer``: ``ClinKDTrainer`` (a transformers Trainer).
* ``run``: ``prepare_run`` (every check before training) and ``run_training`` (stages, resume); the
  checks are ``checks``', the models ``models``', what the run writes beside them ``artifacts``'.
* ``lora``: LoRA stages through PEFT (``wrap_lora``, ``save_lora_stage``; the config key ``lora``).
* ``cli``: the ``clinkd train / check / distill / presets`` commands.

The names below are imported on first use (the trainer pulls in transformers and accelerate).
"""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        ".errors": ("ConfigError",),
        ".config": ("load_config", "parse_config"),
        ".specs": ("KDSettings", "KDStage", "LoraSpec", "ModelSpec", "RCTStage", "RunConfig", "SFTStage", "StageSpec"),
        ".curriculum": ("MarginCurriculum", "margin_weights"),
        ".presets": ("describe_presets", "get_preset", "preset_names", "register_preset"),
        ".run": ("PreparedRun", "prepare_run", "run_training"),
        ".models": ("build_model",),
        ".artifacts": ("ensure_store",),
        ".trainer": ("ClinKDTrainer",),
    },
)
