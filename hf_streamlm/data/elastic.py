"""Elastic resume: a checkpoint's data state taken up by another number of processes or workers.

The data state of a checkpoint describes, for each reader that wrote it (rank ``r`` of ``N``,
DataLoader worker ``w`` of ``W``), where that reader stood in its share of the stream: the source
positions (``datasets``' per-shard position and the mixture's RNG, in the reader's anchor), how many
documents of the pass it read, and the documents in flight (shuffle buffer, tokenizing chunk, packing
remainder) as serials and content keys. Nothing in it is tied to the processes that take it up.

A resume on another layout (``N' x W'`` readers) hands that state out:

- each old reader becomes a *virtual reader*, rebuilt exactly where it stood (its share of the
  stream opened as it was, in any process: :class:`ShareStream`; its snapshot loaded and the batches
  consumed since replayed, as a same-layout resume does);
- its documents not yet read, up to the end of the newest pass any old reader had started, are split
  over the new readers assigned to it (row ``t`` after the stop goes to part ``t mod k``), and its
  documents in flight are re-queued to those owners the same way, and so are the documents of its
  packing remainder (tokens already cut from the text; the first, partly trained, to the first owner).
  A new reader taking over several old ones merges their remainders by pass: a remainder is a whole
  tokenized chunk (256 documents), which spans many passes of a small share, and appended one old
  reader after the other a later reader's first pass would wait behind the earlier ones' later passes;
- after that pass, each new reader reads its own share of the stream (its layout's).

Each document of a pass is therefore read by exactly one reader: 0 duplicated, 0 missing. The mixture's
randomness continues: the old readers' sources are read from their saved RNG state. The order differs
from an uninterrupted run's.

Until a new reader has left the passes it took over, its state is *its origin* (what it was handed)
and the number of batches it produced since: a resume on the same layout rebuilds it and replays
those batches (exact, at the price of re-reading what it read since the layout change). A second
layout change in that window is refused with one line.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterator
from typing import Any

from datasets.formatting import get_formatter
from datasets.iterable_dataset import shift_ex_examples_rngs


def readers(processes: int, workers: int) -> list[tuple[int, int]]:
    """``(rank, worker)`` of every reader of a layout, in a fixed order (``workers=0``: one per rank)."""
    return [(r, w) for r in range(processes) for w in range(max(1, workers))]


def assign(old: int, new: int) -> list[list[tuple[int, int, int]]]:
    """For each of ``new`` readers: ``(old reader, k, part)`` it takes over. With at least as many new
    readers, old reader ``i`` is split over the new readers ``j`` with ``j mod old == i``; with fewer,
    new reader ``j`` takes the old readers ``i`` with ``i mod new == j`` whole."""
    if new >= old:
        plan = []
        for j in range(new):
            owners = list(range(j % old, new, old))
            plan.append([(j % old, len(owners), owners.index(j))])
        return plan
    return [[(i, 1, 0) for i in range(j, old, new)] for j in range(new)]


def origins(states: list[dict[str, Any]], processes: int, workers: int, rank: int,
            settings: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """What each DataLoader worker of ``rank`` takes over from the old ranks' loader ``states`` (one per
    old rank, as ``ResumableLoader.state_dict`` wrote them) under the new layout ``processes x workers``.
    ``settings``: what the old readers were built with (``batch_size``, per-worker ``buffer``,
    ``with_documents``), to rebuild them exactly."""
    old_workers = states[0]["num_workers"]
    old = readers(len(states), old_workers)
    entries = []
    for r, w in old:
        state = states[r]
        saved = state["workers"].get(w)
        entries.append({"rank": r, "worker": w, "snapshot": saved["snapshot"] if saved else None,
                        "skip": saved["skip"] if saved else 0, "processes": len(states), "workers": old_workers,
                        **settings})
    if any(e["snapshot"] is not None and "replay" in e["snapshot"] for e in entries):
        raise ElasticRefused("the checkpoint was written while its readers were still finishing a pass taken "
                             "over from an earlier layout change")
    last_epoch = max(max(s.get("read_epochs", {}).values(), default=s.get("epoch", 0)) for s in states)
    new = readers(processes, workers)
    plan = assign(len(old), len(new))
    out = {}
    for j, (r, w) in enumerate(new):
        if r != rank:
            continue
        parts = [{**copy.deepcopy(entries[i]), "k": k, "part": part} for i, k, part in plan[j]]
        out[w] = {"parts": parts, "last_epoch": last_epoch}
    return out


class ElasticRefused(ValueError):
    """A layout change this checkpoint cannot take (the message says why)."""


class ShareStream:
    """One old reader's share of a rank's stream (DataLoader worker ``worker`` of ``workers``), readable
    in any process. ``datasets`` splits a stream over DataLoader workers by the worker the iteration
    runs in (``get_worker_info``), which after a layout change is not the worker that read the share:
    this applies the same split (``shard_data_sources(contiguous=False)`` and the per-worker RNG shift,
    as ``IterableDataset._iter_pytorch`` of datasets 5.2) for the old worker explicitly."""

    def __init__(self, ds, workers: int, worker: int):
        self.ds, self.workers, self.worker = ds, workers, worker
        self._start: dict | None = None
        self._state: dict | None = None

    def set_epoch(self, epoch: int) -> None:
        self.ds.set_epoch(epoch)

    def load_state_dict(self, state: dict) -> None:
        self._start = state

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state)

    def __iter__(self) -> Iterator[dict]:
        ds = self.ds
        ex = ds._prepare_ex_iterable_for_iteration()
        if self.workers:
            if not ex.split_shard_indices_by_worker(num_shards=self.workers, index=self.worker, contiguous=False):
                return
            ex = ex.shard_data_sources(num_shards=self.workers, index=self.worker, contiguous=False)
            ex = shift_ex_examples_rngs(ex_iterable=ex, value=self.worker)
        self._state = {"examples_iterable": ex._init_state_dict(), "epoch": ds.epoch}
        if self._start and ds.epoch == self._start["epoch"]:
            ex.load_state_dict(self._start["examples_iterable"])
            self._state["examples_iterable"] = ex._state_dict
        if ds._formatting and (ex.iter_arrow or ds._formatting.is_table):
            formatter = get_formatter(ds._formatting.format_type, features=ds.features)
            for _, table in ex.iter_arrow():
                yield formatter.format_row(table)
            return
        for _, example in ex:
            yield example


class Prelude:
    """The documents a new reader takes over, pass by pass: first the re-queued documents in flight of
    that pass, then its part of each old reader's rest of the pass. ``next(epoch)`` gives None at the
    end of the pass ``epoch``'s part."""

    def __init__(self, held: dict[int, deque], cursors: list[list], last_epoch: int):
        self.held = held  # epoch -> documents in flight handed to this reader
        self.cursors = cursors  # [old pipeline, k, part, rows read since the stop]
        self.last_epoch = last_epoch
        self.first_epoch = min([*held, *(c[0].epoch for c in cursors), last_epoch])
        self.current = 0

    def next(self, epoch: int):
        queue = self.held.get(epoch)
        if queue:
            return queue.popleft()
        while self.current < len(self.cursors):
            cursor = self.cursors[self.current]
            old = cursor[0]
            if old.epoch != epoch:  # this old reader is past the pass (or read it to its end)
                self.current += 1
                continue
            doc = old._read()
            if doc is None:
                old._next_pass()
                self.current += 1
                continue
            t = cursor[3]
            cursor[3] += 1
            if t % cursor[1] == cursor[2]:
                return doc
        return None

    def next_pass(self) -> None:
        self.current = 0


def remainder_pieces(old, k: int, part: int) -> list[tuple[int, list[int], int, int]]:
    """Part ``part`` of ``k`` of an old reader's packing remainder, split at its documents' ends:
    ``(epoch, tokens, source, key)`` per document, the ``t``-th document of the remainder to part
    ``t mod k`` (the first, partly trained already, to part 0)."""
    pieces, start = [], old.cut
    for t, (end, source, key, epoch) in enumerate(old.doc_ends):
        if t % k == part:
            pieces.append((int(epoch), old.tokens[start - old.cut:end - old.cut], int(source), int(key)))
        start = end
    return pieces
