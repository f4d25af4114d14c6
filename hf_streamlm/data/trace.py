"""The document trace (``data.trace_documents``): which documents each optimizer step trained on.

``<run>/trace/rank-<r>.jsonl`` holds one line per optimizer step, ``{"step": N, "docs": [[source_index,
key, epoch], ...]}``: ``key`` is ``hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()`` of
the document as read from its source, ``epoch`` the pass it was read in (0 first), and a document is
listed once, at the step whose batch holds its last token. The audit for exact (and elastic) resume, and
the lineage of a model: the file reads as one uninterrupted run (no line lost or repeated).

**Append-only, cut by length.** The file is only ever appended to. When a checkpoint is written, each rank
flushes its trace file to disk (``fsync``) and records its length in bytes in the checkpoint, in
``trace_<rank>.json`` (``{"rank-<r>.jsonl": bytes}``, written by that rank, so that each node records the
files on its own disk; the main process adds the files of ranks gone after a resume on fewer processes).
The record is written before the checkpoint is complete, so a checkpoint never points past trace bytes on
disk. A resume cuts the file back to the recorded length with one ``truncate`` (a cost independent of the
file's size; a kill at any moment leaves either the whole file or the cut one, both holding every line up to
the checkpoint), and appends from there. The main process cuts the files of ranks that are gone the same way.

A checkpoint written before the record existed (or a file it does not record) falls back to a streaming cut:
the lines up to the checkpoint's step are copied line by line to a temporary file, which replaces the trace
in one rename (never the whole file in memory; a kill leaves the original). A line cut short by a kill
mid-write is dropped there.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from hf_streamlm.durable import sync_dir

logger = logging.getLogger(__name__)

RECORD = "trace_{rank}.json"
"""The per-rank record in a checkpoint folder: ``{file name: bytes}`` of the trace files at the save."""


def trace_folder(output_dir: str | os.PathLike) -> Path:
    """Where a run's trace files are: ``<run>/trace``."""
    return Path(output_dir) / "trace"


def trace_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rank-{rank}.jsonl"


def _rank_of(path: Path) -> int | None:
    try:
        return int(path.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


class DocumentTrace:
    """Appends one line per optimizer step to ``trace/rank-<r>.jsonl``; built at the start of a run, it first
    cuts the file back to the checkpoint resumed from (``checkpoint``; ``None``: a fresh start, an empty file)."""

    def __init__(self, folder: Path, rank: int, resume_step: int = 0, world_size: int = 1,
                 checkpoint: Path | None = None):
        self.path = trace_file(folder, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        recorded = recorded_lengths(checkpoint) if checkpoint is not None else None
        cut(self.path, resume_step, recorded)
        if rank == 0:  # after a resume on fewer processes, the files of the ranks gone end at the checkpoint too
            for path in self.path.parent.glob("rank-*.jsonl"):
                if (_rank_of(path) or 0) >= world_size:
                    cut(path, resume_step, recorded)

    def write(self, step: int, docs: list[list]) -> None:
        """The step's line: the documents that ended in its micro-batches (``loader.take_documents()``).
        Flushed to the OS at once; flushed to disk with each checkpoint (:func:`record_lengths`)."""
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "docs": docs}, separators=(",", ":")) + "\n")


def record_lengths(folder: Path, rank: int, world_size: int) -> dict[str, int]:
    """At a checkpoint: flush this rank's trace file to disk and return ``{name: bytes}`` of it (0 when it does
    not exist yet); rank 0 adds the files of ranks ``>= world_size`` (gone after a resume on fewer processes:
    nobody appends to them, so their length is final)."""
    paths = [trace_file(folder, rank)]
    if rank == 0 and Path(folder).is_dir():
        paths += sorted(p for p in Path(folder).glob("rank-*.jsonl") if (_rank_of(p) or 0) >= world_size)
    lengths = {}
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            lengths[path.name] = 0
            continue
        try:
            os.fsync(fd)  # the lines written so far, on disk before the checkpoint that counts them
            lengths[path.name] = os.fstat(fd).st_size
        finally:
            os.close(fd)
    return lengths


def recorded_lengths(checkpoint: Path) -> dict[str, int] | None:
    """``{name: bytes}`` of the trace files as a checkpoint recorded them (every rank's record this node sees),
    or None for a checkpoint without a record (written before it existed, or with the trace off)."""
    lengths: dict[str, int] | None = None
    for record in sorted(Path(checkpoint).glob(RECORD.format(rank="*"))):
        try:
            found = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        lengths = {**(lengths or {}), **{str(k): int(v) for k, v in found.items()}}
    return lengths


def cut(path: Path, step: int, recorded: dict[str, int] | None) -> None:
    """Cut a trace file back to a checkpoint of ``step``: to its recorded length when ``recorded`` names it,
    else (a checkpoint without a record) to the lines up to ``step``, streamed. A fresh start (``step`` 0)
    empties it."""
    leftover = _partial(path)
    if leftover.exists():  # a streaming cut killed midway: the original is still whole
        leftover.unlink()
    if not path.exists():
        return
    if step == 0:
        _truncate(path, 0)
        return
    length = recorded.get(path.name) if recorded else None
    if length is not None:
        size = path.stat().st_size
        if size < length:
            logger.warning("document trace %s has %d bytes, the checkpoint recorded %d: lines written before the "
                           "checkpoint were lost (the file was replaced or restored from an older copy); kept as is",
                           path, size, length)
            return
        if length == 0 or _ends_a_line(path, length):
            _truncate(path, length)
            return
        logger.warning("document trace %s does not end a line at the %d bytes the checkpoint recorded (the file was "
                       "replaced); cutting it at step %d line by line", path, length, step)
    drop_after(path, step)


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.cut")


def _ends_a_line(path: Path, length: int) -> bool:
    with path.open("rb") as f:
        f.seek(length - 1)
        return f.read(1) == b"\n"


def _truncate(path: Path, length: int) -> None:
    """One ``truncate`` (atomic: a kill leaves the file before or after it), then flushed to disk."""
    if path.stat().st_size == length:
        return
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, length)
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_after(path: Path, step: int) -> None:
    """Keep the lines of a trace file up to ``step`` (a line cut short by a kill mid-write is past it): copied
    line by line to a temporary file that replaces the trace in one rename; a kill midway leaves the original."""
    if not path.exists():
        return
    tmp = _partial(path)
    with path.open("rb") as src, tmp.open("wb") as dst:
        for line in src:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("step", step + 1) <= step:
                dst.write(line if line.endswith(b"\n") else line + b"\n")
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)
    sync_dir(path.parent)


def read_trace(path: str | Path) -> list[dict]:
    """The rows of a trace file (a last line cut short by a kill is dropped)."""
    rows = []
    with Path(path).open() as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
