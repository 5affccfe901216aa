"""ClinKD training: pseudo-label KD stage with the confidence-margin curriculum, then SFT.

* ``config``: the YAML run schema (``load_config``, ``parse_config``, ``RunConfig``, ``ConfigError``).
* ``presets``: named configs (``register_preset``, ``get_preset``, ``preset_names``).
* ``curriculum``: ``MarginCurriculum`` / ``margin_weights`` (the rule is in its docstring).
* ``trainer``: ``ClinKDTrainer`` (a transformers Trainer) and ``KDSettings``.
* ``run``: ``prepare_run`` (every check before training) and ``run_training`` (stages, resume).
"""

from .config import ConfigError, RunConfig, StageSpec, load_config, parse_config
from .curriculum import MarginCurriculum, margin_weights
from .presets import describe_presets, get_preset, preset_names, register_preset
from .run import PreparedRun, build_model, ensure_store, prepare_run, run_training
from .trainer import ClinKDTrainer, KDSettings

__all__ = ["ClinKDTrainer", "ConfigError", "KDSettings", "MarginCurriculum", "PreparedRun", "RunConfig", "StageSpec",
           "build_model", "describe_presets", "ensure_store", "get_preset", "load_config", "margin_weights",
           "parse_config", "prepare_run", "preset_names", "register_preset", "run_training"]
