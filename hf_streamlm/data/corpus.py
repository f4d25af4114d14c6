"""Corpora shipped with the package, so the default recipe trains on real text with no network.

``pydocs``: about 1,300 documents (118k words) of English prose from CPython's Language Reference
topics and standard-library docstrings (PSF licence), built by ``tools/build_corpus.py``.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent / "corpus"

BUILTIN_CORPORA: dict[str, Path] = {"pydocs": _HERE / "pydocs.jsonl.gz"}
"""Name -> JSON-lines file with a ``text`` column."""
