"""Typed configuration: one dataclass per section, recipes, dotted overrides, validation.

Sections and key names follow the ``training.yaml`` of the RunPod 1B guide (seed 004): ``model``,
``tokenizer``, ``data``, ``optimizer``, ``scheduler``, ``runtime`` (with ``checkpoint``,
``evaluation``, ``logging``), plus ``hub``. Every field carries a docstring (the string literal under
it), which ``hf-streamlm train --help`` prints.

Precedence: command line > recipe > dataclass defaults (nanoGPT's configurator, torchtitan's config
manager). Unknown keys, wrong types and impossible combinations raise :class:`ConfigError` with a
one-line message naming the key and the valid choices, before anything heavy is built.

One module per job, imported here so ``from hf_streamlm.config import Config, ConfigError`` is the
public door: :mod:`.sections` (the dataclasses), :mod:`.schema` (building them from plain data, field
docs), :mod:`.recipes` (recipes, overrides, :func:`load_config`), :mod:`.validation` (cross-field
checks), :mod:`.reference` (the generated key reference).
"""

from hf_streamlm.config.errors import ConfigError
from hf_streamlm.config.recipes import (
    DECODER_ONLY_KEYS,
    RECIPES_DIR,
    available_recipes,
    load_config,
    parse_override,
    read_recipe,
    recipe_path,
)
from hf_streamlm.config.reference import describe, reference_markdown
from hf_streamlm.config.schema import build, field_docs, iter_keys, type_name
from hf_streamlm.config.sections import (
    BestConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    EvaluationConfig,
    HubConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    RuntimeConfig,
    SchedulerConfig,
    SourceConfig,
    TokenizerConfig,
)
from hf_streamlm.config.validation import validate, wsd_steps

__all__ = [
    "BestConfig", "CheckpointConfig", "Config", "ConfigError", "DECODER_ONLY_KEYS", "DataConfig",
    "EvaluationConfig", "HubConfig", "LoggingConfig", "ModelConfig", "OptimizerConfig", "RECIPES_DIR",
    "RuntimeConfig", "SchedulerConfig", "SourceConfig", "TokenizerConfig", "available_recipes", "build",
    "describe", "field_docs", "iter_keys", "load_config", "parse_override", "read_recipe", "recipe_path",
    "reference_markdown", "type_name", "validate", "wsd_steps",
]
