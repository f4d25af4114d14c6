"""The one exception bad configuration raises; every config module imports it from here."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input in a recipe or an override: printed as one line, no traceback."""
