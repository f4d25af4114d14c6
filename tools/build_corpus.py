"""Build the offline corpus shipped with hf_streamlm (``hf_streamlm/data/corpus/pydocs.jsonl.gz``).

The quickstart recipe must train on *real* English text on a machine with no network. CPython ships
such text with every installation: the Language Reference topics of ``pydoc_data`` and the docstrings
of the standard library (PSF licence, redistributable). This script turns them into one JSON line per
paragraph-group document. It is run by hand when the corpus is refreshed; the output is committed so
that every machine trains on the same bytes whatever its Python version.

    python tools/build_corpus.py hf_streamlm/data/corpus/pydocs.jsonl.gz
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import pkgutil
import re
import sys
import warnings

MIN_WORDS = 12
"""Paragraphs shorter than this are headings or fragments, not prose."""


def prose_paragraphs(text: str) -> list[str]:
    """Split reStructuredText-ish docs into prose paragraphs, dropping code and tables."""
    out = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(text)):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if any(line.lstrip().startswith((">>>", "...", "$ ", "+--", "===", "***", "---")) for line in lines):
            continue
        if sum(ch in "{}[]()=;_" for ch in block) > 0.08 * len(block):
            continue
        paragraph = " ".join(line.strip() for line in lines)
        if len(paragraph.split()) >= MIN_WORDS:
            out.append(paragraph)
    return out


def topic_documents() -> list[tuple[str, str]]:
    import pydoc_data.topics

    docs = []
    for name, text in sorted(pydoc_data.topics.topics.items()):
        paragraphs = prose_paragraphs(text)
        # Group consecutive paragraphs into documents of a few hundred words: closer to the
        # size of a web document than single paragraphs are.
        group: list[str] = []
        for paragraph in paragraphs:
            group.append(paragraph)
            if sum(len(p.split()) for p in group) > 250:
                docs.append((f"topics/{name}", "\n\n".join(group)))
                group = []
        if group:
            docs.append((f"topics/{name}", "\n\n".join(group)))
    return docs


def docstring_documents() -> list[tuple[str, str]]:
    skip = ("test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "antigravity", "this")
    docs = []
    names = sorted(m.name for m in pkgutil.iter_modules() if m.module_finder.path.endswith(("lib/python3.11",)))
    for name in names:
        if name.startswith(("_",) + skip):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - optional stdlib modules (e.g. curses) may be absent
            continue
        objects = [module] + [
            obj
            for _, obj in sorted(vars(module).items())
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == name
        ]
        for obj in objects:
            paragraphs = prose_paragraphs(inspect.getdoc(obj) or "")
            if paragraphs:
                docs.append((f"docstrings/{name}.{getattr(obj, '__qualname__', '')}".rstrip("."), "\n\n".join(paragraphs)))
    return docs


def main(path: str) -> None:
    docs = topic_documents() + docstring_documents()
    seen = set()
    with gzip.GzipFile(path, "wb", mtime=0) as raw:
        for source, text in docs:
            if text in seen:
                continue
            seen.add(text)
            raw.write((json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n").encode())
    words = sum(len(t.split()) for t in seen)
    print(f"{len(seen)} documents, {words} words -> {path}")


if __name__ == "__main__":
    main(sys.argv[1])
