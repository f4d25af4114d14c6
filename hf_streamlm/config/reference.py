"""The generated reference: every key with its type, default and doc (``--help``, docs/configuration.md)."""

from __future__ import annotations

import dataclasses
from typing import Any

from hf_streamlm.config.schema import iter_keys, type_name
from hf_streamlm.config.sections import Config


def describe() -> str:
    """All keys with their types, defaults and docs (for ``--help``)."""
    defaults = dataclasses.asdict(Config())
    lines = []
    for key, tp, doc in iter_keys():
        value: Any = defaults
        for part in key.split("."):
            value = value[part]
        lines.append(f"  {key} ({type_name(tp)}, default {value!r})\n      {doc}")
    return "\n".join(lines)


def reference_markdown() -> str:
    """``docs/configuration.md``: every key with type, default and doc, generated from the dataclasses."""
    defaults = dataclasses.asdict(Config())
    lines = [
        "# Configuration reference",
        "",
        "A recipe is a YAML file of the sections below; any key can be overridden on the command line as",
        "`section.key=value` (values are YAML). Precedence: command line > recipe > defaults. Unknown keys,",
        "wrong types and impossible combinations stop the run with a one-line error naming the key.",
        "",
        "`python -m hf_streamlm.run --help` prints this list; `hf-streamlm config recipe=NAME [overrides]`",
        "prints a resolved config. This page is generated from `hf_streamlm/config/` by",
        "`hf-streamlm config --reference > docs/configuration.md`; a test keeps it in sync.",
    ]
    section = None
    for key, tp, doc in iter_keys():
        top = key.split(".")[0]
        if top != section:
            section = top
            lines += ["", f"## `{top}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        value: Any = defaults
        for part in key.split("."):
            value = value[part]
        kind = type_name(tp).replace("|", "\\|")
        lines.append(f"| `{key}` | {kind} | `{value!r}` | {' '.join(doc.split())} |")
    return "\n".join(lines) + "\n"
