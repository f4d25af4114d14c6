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
  documents in flight are re-queued to those owners the same way;
- its packing content (tokens already cut from the text) is dealt out in the blocks the old reader
  would have made next (block ``u`` to part ``u mod k``; the first, whose first document is partly
  trained already, to part 0): a new reader starts a block with each handed-over block and completes a
  short one with its own tokens, so every handed-over token keeps its place in its block, and with it
  its ``position_ids`` and document segment (``data.document_masking``), as in an uninterrupted run.
  A new reader taking over several old ones merges their blocks by pass: a packing remainder is a whole
  tokenized chunk (256 documents), which spans many passes of a small share, and appended one old
  reader after the other a later reader's first pass would wait behind the earlier ones' later passes;
- after that pass, each new reader reads its own share of the stream (its layout's).

Each document of a pass is therefore read by exactly one reader: 0 duplicated, 0 missing. The mixture's
randomness continues: the old readers' sources are read from their saved RNG state. The order differs
from an uninterrupted run's.

While a new reader reads the passes it took over (on an endless stream: for good), its state stays
bounded and its resume cost flat, however long ago the layout change was: like a native reader it
notes anchors (:class:`Prelude` ``position()``: each old reader's source position, the rows it read,
how many handed-over documents are taken), and its state is the usual one, anchored there. A resume
re-opens the old readers at the anchor's positions and reads forward to where the reader stood (no
tokenizing, no batches replayed). Only the documents in flight handed over at the change need more:
their text can only be re-read by rebuilding the old readers from their snapshots, so the state carries
the *origin* (what the reader was handed) until an anchor lies past the point where they were all
taken. A reader that is itself still in such passes is handed out at a further layout change like any
other: rebuilt from its state, its rest read through it.
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
    # The newest pass any old reader had started: per source where sources are read on their own
    # (hf_streamlm.data.mixture: a list per reader).
    epochs = [e for s in states for e in s.get("read_epochs", {}).values()] or [s.get("epoch", 0) for s in states]
    last_epoch = [max(column) for column in zip(*epochs)] if isinstance(epochs[0], list) else max(epochs)
    new = readers(processes, workers)
    plan = assign(len(old), len(new))
    out = {}
    for j, (r, w) in enumerate(new):
        if r != rank:
            continue
        parts = [{**copy.deepcopy(entries[i]), "k": k, "part": part} for i, k, part in plan[j]]
        out[w] = {"parts": parts, "last_epoch": last_epoch, "tokens": trained_tokens(entries)}
    return out


def trained_tokens(entries: list[dict[str, Any]]) -> int:
    """Global tokens trained at the checkpoint: the old readers' tokens handed out (each snapshot's, and the batches
    consumed after it) on top of their common start (the data schedules' clock, ``WorkerPipeline.trained``)."""
    base, total = 0, 0
    for entry in entries:
        snapshot = entry["snapshot"] or {}
        start, emitted = snapshot.get("clock") or ((snapshot.get("origin") or {}).get("tokens", 0), 0)
        base = max(base, start)
        total += emitted + entry["skip"] * entry["batch_size"] * entry.get("sequence_length", 0)
    return int(base + total)


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
    """The documents a new reader takes over, pass by pass: first the documents in flight handed to it at the
    change (``held``, by pass), then its part of each old reader's rest of the pass. ``next(epoch)`` gives None at
    the end of the pass ``epoch``'s part. ``position()`` is where it stands, as small whatever it has read."""

    def __init__(self, parts: list[dict], held: dict[int, list], cursors: list[list], last_epoch: int,
                 taken: dict[int, int] | None = None, current: int = 0):
        self.parts = parts  # the old readers (rank, worker, layout, settings, k, part), in cursor order
        self.held = held  # epoch -> documents in flight handed to this reader (None once taken: no text kept)
        self.taken = dict(taken or {})  # epoch -> how many of them are taken
        self.cursors = cursors  # [old pipeline, k, part, rows read since the stop]
        self.last_epoch = last_epoch
        self.first_epoch = min([*held, *(c[0].epoch for c in cursors), last_epoch])
        self.current = current

    def next(self, epoch: int):
        queue, n = self.held.get(epoch, ()), self.taken.get(epoch, 0)
        if n < len(queue):
            doc, queue[n] = queue[n], None
            self.taken[epoch] = n + 1
            return doc
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

    def held_left(self) -> int:
        """Handed-over documents in flight not taken yet."""
        return sum(len(queue) - self.taken.get(epoch, 0) for epoch, queue in self.held.items())

    def position(self) -> dict[str, Any]:
        """Where the reading stands: each old reader's position and rows read, the cursor read now, the held
        documents taken per pass (``WorkerPipeline`` re-opens it from this, with the origin while ``held_left``)."""
        return {"parts": self.parts, "cursors": [[c[0].position(), c[3]] for c in self.cursors],
                "current": self.current, "taken": dict(self.taken), "held_left": self.held_left(),
                "last_epoch": self.last_epoch}


def open_prelude(reader, position: dict[str, Any]) -> None:
    """The passes a reader (a ``WorkerPipeline``) took over at a layout change, as they stood at a prelude anchor: the
    old readers re-opened at its positions (rebuilt from the origin first while a handed-over document in flight is
    left)."""
    if reader.origin is not None:
        held, cursors, _ = reader._take_over(reader.origin)
    else:
        held, cursors = {}, [[reader.open_reader(part), part["k"], part["part"], 0] for part in position["parts"]]
    for cursor, (where, t) in zip(cursors, position["cursors"]):
        cursor[0]._seek(where)
        cursor[3] = t
    reader.prelude = Prelude(position["parts"], held, cursors, position["last_epoch"], position["taken"],
                             position["current"])


def rebuilt(old, part: dict[str, Any]):
    """``old`` (a reader of the layout ``part`` names, just opened) where it stood: its snapshot loaded, the batches
    consumed after it replayed."""
    if part["snapshot"] is not None:
        old.load_state_dict(part["snapshot"])
        for _ in range(part["skip"]):
            old.next_batch()
    return old


def take_counts(reader, old) -> None:
    """Add ``old``'s documents and tokens per source and its skips to ``reader``'s counts."""
    for source, n in old.source_docs.items():
        reader.source_docs[source] = reader.source_docs.get(source, 0) + n
    for source, n in old.source_tokens.items():
        reader.source_tokens[source] = reader.source_tokens.get(source, 0) + n
    for kind, n in old.skipped().items():
        reader.skipped_before[kind] = reader.skipped_before.get(kind, 0) + n


def needs_origin(source: Any) -> bool:
    """Whether a reader anchored at ``source`` (an anchor's source position) can only be rebuilt from its origin:
    some document in flight handed over at a layout change, to it or to an old reader it reads through, is not
    taken yet there, and its text is only in the old readers' snapshots."""
    if not (isinstance(source, dict) and "prelude" in source):
        return False
    position = source["prelude"]
    return position["held_left"] > 0 or any(needs_origin(where["anchor"][2]) for where, _ in position["cursors"])


def packed_ahead(reader) -> list[list[tuple]]:
    """The blocks a reader (a ``WorkerPipeline``) would make next from its packing content, as pieces ``(tokens,
    source, key, epoch, ends)`` (a document's tokens in the block; ``ends``: its last token is there): the blocks in
    its block-shuffle buffer first, then its handed-over blocks, each completed by the tokens after it, then the
    rest cut at the block size. The last may be short: the documents that would complete them are not tokenized yet."""
    rest: deque[tuple] = deque()
    start = reader.cut
    for end, source, key, epoch in reader.doc_ends:
        rest.append((reader.tokens[start - reader.cut:end - reader.cut], source, key, epoch, True))
        start = end
    room = reader.block_size
    # The block shuffle's buffer: whole blocks, already cut.
    blocks = [b.unpack() for b in reader.blocks + ([reader.block_wait] if reader.block_wait is not None else [])]
    blocks += [block + _take_pieces(rest, room - sum(len(p[0]) for p in block)) for block in reader.handed]
    while rest:
        blocks.append(_take_pieces(rest, room))
    return blocks


def _take_pieces(pieces: deque[tuple], room: int) -> list[tuple]:
    """Up to ``room`` tokens from the front of ``pieces`` (``(tokens, source, key, epoch, ends)``), a piece cut at the
    end if it does not fit (its head does not end its document)."""
    out = []
    while pieces and room > 0:
        tokens, source, key, epoch, ends = pieces.popleft()
        if len(tokens) > room:
            pieces.appendleft((tokens[room:], source, key, epoch, ends))
            tokens, ends = tokens[:room], False
        out.append((tokens, source, key, epoch, ends))
        room -= len(tokens)
    return out
