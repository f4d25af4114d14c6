"""The one exception bad configuration raises (every config module imports it from here), and the one
line it is shown as."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input in a recipe or an override: printed as one line, no traceback."""


def one_line(message: str) -> str:
    """A :class:`ConfigError` message as the user sees it: one raised in a DataLoader worker arrives with
    torch's ``Original Traceback`` appended; only its last line, the error itself, is kept."""
    if "Original Traceback" in message:
        message = message.strip().splitlines()[-1].split("ConfigError: ", 1)[-1]
    return message
