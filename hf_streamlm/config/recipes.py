"""Recipes and ``key=value`` overrides resolved into a validated :class:`~.sections.Config`.

Precedence: command line > recipe > dataclass defaults (nanoGPT's configurator, torchtitan's config
manager).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from hf_streamlm.config.errors import ConfigError
from hf_streamlm.config.schema import build
from hf_streamlm.config.sections import Config
from hf_streamlm.config.validation import validate

logger = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).parent.parent / "recipes"
"""The shipped recipes: ``recipes/`` at the top of the repository, linked here so wheels carry them."""


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """``quickstart`` -> the shipped recipe; ``path/to/x.yaml`` -> that file."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"recipe file '{name}' does not exist")
        return candidate
    shipped = RECIPES_DIR / f"{name}.yaml"
    if not shipped.is_file():
        raise ConfigError(f"unknown recipe '{name}'. Available recipes: {', '.join(available_recipes())}")
    return shipped


def read_recipe(name: str) -> dict[str, Any]:
    path = recipe_path(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"recipe '{path}'{where} is not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{path}' must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(arg: str) -> tuple[list[str], Any]:
    """``optimizer.learning_rate=3e-4`` -> (["optimizer", "learning_rate"], 0.0003); values are YAML."""
    if "=" not in arg:
        raise ConfigError(f"argument '{arg}' is not of the form key=value (e.g. optimizer.learning_rate=3e-4)")
    key, raw = arg.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"argument '{arg}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: take it as the plain string the user typed
    # YAML 1.1 reads '3e-4' as a string (it wants '3.0e-4'); people type the former.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") and not value.isalpha() else value
        except ValueError:
            pass
    return key.split("."), value


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(parts):
        out = {part: out}
    return out


def _fix_yaml_floats(data: Any) -> Any:
    """PyYAML follows YAML 1.1, where ``1.8e-4`` without a dot in the mantissa is a string."""
    if isinstance(data, dict):
        return {k: _fix_yaml_floats(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_fix_yaml_floats(v) for v in data]
    if isinstance(data, str):
        try:
            return float(data) if data.strip() and "e" in data.lower() and data.lower() not in ("e",) else data
        except ValueError:
            return data
    return data


def _apply_preset(data: dict[str, Any]) -> dict[str, Any]:
    """Put a ``model.preset``'s values under the model section (recipe and command line win)."""
    model = data.get("model")
    if not isinstance(model, dict) or model.get("preset") is None:
        return data
    from hf_streamlm.models.presets import MODEL_PRESETS

    name = model["preset"]
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown 'model.preset' {name!r}. Presets: {', '.join(MODEL_PRESETS)}")
    return {**data, "model": _merge(MODEL_PRESETS[name], model)}


DECODER_ONLY_KEYS = ("num_key_value_heads", "rope_mode", "rope_theta", "rope_factor")
"""Model keys only a decoder has: a recipe that uses them without ``model.type`` (seed 004's
training.yaml, written for a decoder-only tool) means a decoder."""


def _infer_family(data: dict[str, Any]) -> None:
    model = data.get("model")
    if isinstance(model, dict) and "type" not in model and any(k in model for k in DECODER_ONLY_KEYS):
        model["type"] = "decoder"
        logger.info("model.type is not set but the model section has decoder keys (%s): model.type=decoder",
                    ", ".join(k for k in DECODER_ONLY_KEYS if k in model))


def load_config(args: list[str] | None = None, recipe: str | None = None) -> Config:
    """Resolve ``recipe=NAME key=value ...`` into a validated :class:`Config`.

    Precedence: command line > recipe > defaults.
    """
    args = list(args or [])
    overrides: dict[str, Any] = {}
    for arg in args:
        if arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
            continue
        parts, value = parse_override(arg)
        overrides = _merge(overrides, _nest(parts, value))
    data = _fix_yaml_floats(read_recipe(recipe)) if recipe else {}
    data = _merge(data, _fix_yaml_floats(overrides))
    data = _apply_preset(data)
    _infer_family(data)
    if recipe and not (data.get("data") or {}).get("sources") and not (data.get("data") or {}).get("train_shards"):
        logger.warning("recipe %s sets neither data.sources nor data.train_shards: training on the built-in "
                       "pydocs corpus", recipe)
    data["recipe"] = recipe
    config = build(Config, data)
    validate(config)
    return config
