"""Bad input: documents that cannot be trained on are skipped and counted by kind, never silently
dropped; files that cannot be read stop the run with one line naming the file and line.

Skip kinds: ``none`` (null text), ``not_text`` (a number, list ...), ``empty`` (empty or
whitespace only), ``short`` (fewer words than ``min_words``), ``spike`` (named by a rollback after
loss spikes: hf_streamlm.data.skips). Counts live in a per-process registry keyed by the stream that
counts them, so DataLoader workers count their own reads; the training stream carries them into
``history.jsonl`` (``skipped``) and ``hf-streamlm stats`` reports them.
"""

from __future__ import annotations

import glob
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SKIP_KINDS = ("none", "not_text", "empty", "short", "spike")

_COUNTS: dict[str, Counter] = {}


def skip_counter(key: str) -> Counter:
    """The skip counts of the stream ``key`` in this process."""
    return _COUNTS.setdefault(key, Counter())


class TextFilter:
    """Batched ``datasets`` filter: keep real text with at least ``min_words`` words; count the rest."""

    def __init__(self, key: str, min_words: int = 0):
        self.key = key
        self.min_words = min_words

    def reason(self, text: Any) -> str | None:
        if text is None:
            return "none"
        if not isinstance(text, str):
            return "not_text"
        if not text.strip():
            return "empty"
        if self.min_words and len(text.split()) < self.min_words:
            return "short"
        return None

    def __call__(self, batch: dict[str, list]) -> list[bool]:
        keep = []
        counts = skip_counter(self.key)
        for text in batch["text"]:
            why = self.reason(text)
            if why is not None:
                counts[why] += 1
            keep.append(why is None)
        return keep


def locate_bad_file(patterns: str | list[str] | None, builder: str) -> str | None:
    """After a read error: the first local file (and line) that is not UTF-8 or not valid JSON lines."""
    if not patterns or builder not in ("json", "text", "csv"):
        return None
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        if "://" in pattern:
            continue
        for name in sorted(glob.glob(pattern)) or [pattern]:
            path = Path(name)
            if not path.is_file() or path.suffix in (".gz", ".bz2", ".xz", ".zst", ".zip"):
                continue
            with path.open("rb") as f:
                for number, raw in enumerate(f, 1):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as err:
                        return f"{path} line {number} is not UTF-8 ({err.reason} at byte {err.start})"
                    if builder == "json" and path.suffix in (".jsonl", ".json") and line.strip():
                        try:
                            json.loads(line)
                        except json.JSONDecodeError as err:
                            if path.suffix == ".json" and number == 1:
                                break  # a whole-file JSON document, not JSON lines
                            return f"{path} line {number} is not valid JSON ({err.msg})"
    return None
