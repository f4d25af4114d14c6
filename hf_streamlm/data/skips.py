"""Documents a rollback after loss spikes took out of the stream (``runtime.spikes.rollback_after``,
docs/stability.md): ``<run>/skipped_documents.jsonl``, one line per document, ``{"source": index in data.sources,
"key": 16 hex digits (the document trace's), "epoch": the pass it was read in, "step": the skipped step that trained
it, "rollback": 1 for the first rollback ...}``.

Every reader of the run (each rank's and DataLoader worker's :class:`~hf_streamlm.data.stream.WorkerPipeline`, and
each source's reader of a mixture) drops these documents, in every pass, right after tokenization, before they are
packed; each one dropped counts as a ``spike`` skip (``skipped`` in history.jsonl). Matched by ``(source, key)``:
the same text in another source is kept. When a data state is loaded, what it already holds tokenized is purged
too: the documents of the packing remainder, and the blocks of the block-shuffle buffer that hold a piece of one
(whole blocks: a block is ``sequence_length`` tokens, the other documents' pieces in it go with it; logged).
Documents not tokenized yet when the state was written (shuffle buffer, the chunk being tokenized) meet the filter
on their way. Blocks handed over at an elastic resume (another number of processes) are not purged.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SKIPPED_FILE = "skipped_documents.jsonl"


def read_skipped_documents(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of ``<run>/skipped_documents.jsonl`` (``[]`` when there is none)."""
    path = Path(run_dir) / SKIPPED_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class DocumentSkips:
    """The ``(source, key)`` pairs to drop; :meth:`drops` at tokenization, :meth:`purge` after a state is loaded."""

    def __init__(self, keys: set[tuple[int, int]]):
        self.keys = frozenset(keys)

    @classmethod
    def of_run(cls, run_dir: str | Path) -> DocumentSkips | None:
        """The run directory's record, or None when it skips nothing."""
        keys = {(int(row["source"]), int(row["key"], 16)) for row in read_skipped_documents(run_dir)}
        return cls(keys) if keys else None

    def drops(self, pipeline: Any, doc: Any) -> bool:
        """True (and counted) when ``doc`` is to be dropped."""
        if (doc.source, doc.key) not in self.keys:
            return False
        pipeline._skips["spike"] += 1
        return True

    def purge(self, pipeline: Any) -> None:
        """Take the skipped documents out of what ``pipeline``'s loaded state holds tokenized."""
        kept_tokens: list[int] = []
        kept_ends: deque = deque()
        start, cut, dropped = pipeline.cut, pipeline.cut, 0
        for end, source, key, epoch in pipeline.doc_ends:
            if (source, key) in self.keys:
                dropped += 1
            else:
                kept_tokens += pipeline.tokens[start - cut:end - cut]
                kept_ends.append((cut + len(kept_tokens), source, key, epoch))
            start = end
        if dropped:
            pipeline.tokens, pipeline.doc_ends = kept_tokens, kept_ends
            pipeline._skips["spike"] += dropped
        blocks = len(pipeline.blocks) + (pipeline.block_wait is not None)
        pipeline.blocks = [b for b in pipeline.blocks if not self._holds(b)]
        if pipeline.block_wait is not None and self._holds(pipeline.block_wait):
            pipeline.block_wait = None
        blocks -= len(pipeline.blocks) + (pipeline.block_wait is not None)
        if dropped or blocks:
            logger.warning("skipped documents (%s): %d taken out of the packing buffer, %d block(s) of the block "
                           "shuffle dropped", SKIPPED_FILE, dropped, blocks)

    def _holds(self, block: Any) -> bool:
        return any((int(source), int(key)) in self.keys for source, key in block.pieces[:, 1:3].tolist())


__all__ = ["SKIPPED_FILE", "DocumentSkips", "read_skipped_documents"]
