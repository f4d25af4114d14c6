"""The document trace (``data.trace_documents``): which documents each optimizer step trained on.

``<run>/trace/rank-<r>.jsonl`` holds one line per optimizer step, ``{"step": N, "docs": [[source_index,
key, epoch], ...]}``: ``key`` is ``hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()`` of
the document as read from its source, ``epoch`` the pass it was read in (0 first), and a document is
listed once, at the step whose batch holds its last token. The audit for exact (and later elastic)
resume, and the lineage of a model: a resume drops the lines past its checkpoint's step first, so
the file reads as one uninterrupted run (no line lost or repeated).
"""

from __future__ import annotations

import json
from pathlib import Path


class DocumentTrace:
    """Appends one line per optimizer step to ``trace/rank-<r>.jsonl``."""

    def __init__(self, folder: Path, rank: int, resume_step: int = 0, world_size: int = 1):
        self.path = Path(folder) / f"rank-{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_after(self.path, resume_step)
        if rank == 0:  # after a resume on fewer processes, the files of the ranks gone end at the checkpoint too
            for path in self.path.parent.glob("rank-*.jsonl"):
                if int(path.stem.split("-")[1]) >= world_size:
                    drop_after(path, resume_step)

    def write(self, step: int, docs: list[list]) -> None:
        """The step's line: the documents that ended in its micro-batches (``loader.take_documents()``)."""
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "docs": docs}, separators=(",", ":")) + "\n")


def drop_after(path: Path, step: int) -> None:
    """Keep the lines of a trace file up to ``step`` (a line cut short by a kill mid-write is past it)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["step"] <= step:
            kept.append(line + "\n")
    path.write_text("".join(kept))


def read_trace(path: str | Path) -> list[dict]:
    """The rows of a trace file (a last line cut short by a kill is dropped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
