"""The training stream with exact, cheap resume and a state that does not hold text.

``datasets`` keeps the position of its sources, mixture and ``map``/``filter`` stages
(``IterableDataset.state_dict``), but its shuffle buffer comes back empty on resume (measured with
datasets 5.2: a resumed stream repeated and skipped examples). So the stages that hold data live
here, with their own state: the shuffle buffer (contents and RNG), the packing remainder, the
collator's RNG. ``datasets`` below them is used without its shuffle.

The state holds **references, not text** (issue #13: at ``runpod_1b``'s 65,536-document buffer and
~3.4 KB FineWeb documents, text in the state was 218 MB per worker and halved throughput). Every
document a worker reads gets a serial number; every ``ANCHOR_EVERY`` documents (and at each pass start)
the worker notes ``datasets``' source position. The state is: the oldest anchor still needed, how many
documents have been read, and the serials (plus 8-byte content keys) of the documents in the buffer
and in the tokenizer. A resume loads the anchor and reads forward to where the worker was, keeping the
buffered documents' texts on the way; their keys are checked, so a source that changed under the
checkpoint stops the run with one line instead of training on other documents. A snapshot is ~1 MB
whatever the buffer holds; a resume re-reads the span of the stream the buffer covers (at most one
pass: the buffer never mixes passes, see below).

One :class:`WorkerPipeline` runs per rank and DataLoader worker (``datasets`` gives each worker its
own shards). ``data.shuffle_buffer_size`` counts documents **per rank**: each of the rank's workers
shuffles in an equal part of it. A worker attaches a snapshot of its state to every
``snapshot_every``-th batch; the :class:`ResumableLoader` in the training process keeps, per worker,
the newest snapshot it has consumed and how many batches that worker produced since. Resuming loads
the snapshot and replays at most ``snapshot_every - 1`` batches. With ``num_workers=0`` the pipeline
runs in the training process and its state is read directly when a checkpoint is written.
"""

from __future__ import annotations

import copy
import logging
import random
import weakref
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterator
from typing import Any

import datasets
import numpy as np
import torch

from hf_streamlm.config import ConfigError
from hf_streamlm.data.documents import Doc, document_key
from hf_streamlm.data.elastic import Prelude, needs_origin, open_prelude, packed_ahead, rebuilt, take_counts
from hf_streamlm.data.blocks import (Packed, block_of, cut_block, decode_blocks, decode_packed, encode_blocks,
                                     encode_packed, shuffled_block)
from hf_streamlm.data.quality import skip_counter

logger = logging.getLogger(__name__)


def private_copy(texts: datasets.IterableDataset) -> datasets.IterableDataset:
    """A deep copy of ``texts`` that shares huggingface_hub's process-wide cache of `HfFileSystem` instances, which
    every `datasets.IterableDataset` holds a reference to (so that pickling keeps it). Copying the cache would
    re-create each instance, and fsspec keys instances by the creating thread: an instance made in another thread
    (a reader, an upload) would be re-created under a new key, into the dict being copied ("dictionary changed size
    during iteration")."""
    from huggingface_hub import HfFileSystem

    if texts is None:  # a pipeline that mixes sources reads none itself (hf_streamlm.data.mixture)
        return None
    return copy.deepcopy(texts, {id(HfFileSystem._cache): HfFileSystem._cache})

SNAPSHOT_EVERY = 16
"""Batches between state snapshots sent from a DataLoader worker (bounds the replay on resume)."""

ANCHOR_EVERY = 1024
"""Documents between the source positions a worker notes (bounds the extra re-read on resume)."""


class WorkerPipeline:
    """shuffle buffer -> batched tokenization -> packing -> collation, over a ``datasets`` text stream.

    The text stream is cycled forever (one pass = one epoch), so a worker never runs dry while its
    peers still produce and the round-robin order of the DataLoader stays fixed. Each pass is shuffled
    anew by the buffer, whose seeded RNG runs on across passes: the text stream has no shuffle of its
    own, and its ``set_epoch`` only numbers the pass. The shuffle buffer never mixes passes: at the
    end of a pass it is emptied before the next pass is read, so every document of pass ``e`` is
    trained before any of pass ``e + 1`` and ``epoch`` is exact. A pass smaller than the buffer is shuffled whole (the
    buffer is clamped to it, with a warning).
    """

    def __init__(
        self,
        texts: datasets.IterableDataset,
        encode: Callable[[list[str]], list[list[int]]],
        collate: Callable[[list[dict]], dict[str, torch.Tensor]],
        batch_size: int,
        block_size: int,
        shuffle_buffer_size: int,
        seed: int,
        with_documents: bool = False,
        tokenize_batch: int = 256,
        separators: tuple[list[int], list[int]] = ([], []),
        skips_key: str = "default",
        describe_failure: Callable[[Exception], str] | None = None,
        trace: bool = False,
        passes: int | None = None,
        pad_id: int | None = None,
        block_shuffle_size: int = 0,
    ):
        # A private copy: `datasets` keeps the epoch in shared memory so that persistent workers follow
        # the main process; here each worker runs its own passes and must not move its peers' epoch.
        self.texts = private_copy(texts)
        self.encode = encode
        self.collate = collate
        self.batch_size = batch_size
        self.block_size = block_size
        self.shuffle_buffer_size = shuffle_buffer_size
        self.block_shuffle_size = block_shuffle_size
        self.with_documents = with_documents
        self.tokenize_batch = tokenize_batch
        self.head, self.tail = separators  # wrapped around each document: [CLS] x [SEP] or x <eos>
        self.describe_failure = describe_failure
        self.trace = trace
        # Finite use (``hf-streamlm stats``, counting the blocks of an epoch): stop after ``passes``
        # passes; the last batch may be short, and with a ``pad_id`` the last block is padded.
        self.passes = passes
        self.pad_id = pad_id
        self.documents: list[tuple[int, int, int]] | None = None  # set to a list: (source, tokens, bytes) per doc
        # Skipped documents: counted by the source filters in this process; carried in the state.
        self._skips = skip_counter(skips_key)
        self._skips_at_start = Counter(self._skips)
        self.skipped_before: dict[str, int] = {}
        self.skip = None  # documents a rollback after spikes named (data.skips.DocumentSkips), set by the factory
        self.rng = random.Random(seed)
        # The block shuffle after packing: packed blocks (pieces: see `blocks.cut_block`), one pass at a time; a block
        # of the next pass waits in `block_wait` while the buffer drains.
        self.block_rng = random.Random(seed * 7919 + 1)
        self.blocks: list[Packed] = []
        self.block_wait: Packed | None = None
        # Reading: the pass being read, documents read so far (the next serial), rows of this pass.
        self.epoch = 0
        self.read = 0
        self.pass_rows = 0
        self.pass_done = False  # this pass is read to its end; the buffer drains before the next one
        self.anchors: deque[tuple[int, int, dict | None]] = deque()  # (serial, epoch, source state)
        self.buffer: list[Doc] = []
        self.source_docs: dict[int, int] = {}  # documents and tokens tokenized so far, per source
        self.source_tokens: dict[int, int] = {}
        self.tokens: list[int] = []
        self.next_serial = 0
        # Documents whose tokens are in the packing buffer: (end offset in the token stream, source,
        # key, epoch); `cut` is the stream offset of tokens[0].
        self.doc_ends: deque[tuple[int, int, int, int]] = deque()
        self.cut = 0
        # Blocks handed over at a layout change, each made the start of a block here (elastic.packed_ahead).
        self.handed: deque[list[tuple]] = deque()
        self.batch_epoch = 0
        self.batch_docs: list[list] = []
        self.batch_open: list[list] = []  # with the trace: documents with tokens in the batch, not ending there
        self._rows: Iterator[dict] | None = None
        self._resumed_pass = False  # a pass resumed at its very end yields no rows yet is not empty
        self._clamp_warned = False
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: tuple[list[Doc], Future] | None = None
        self.produced = 0  # batches made
        # Where the run stands, in global tokens trained (data schedules): this reader's tokens emitted since
        # `base_tokens`, times the readers of its layout (hf_streamlm.data.schedule).
        self.readers = 1
        self.base_tokens = 0
        self.emitted = 0
        self.mlm_schedule = None  # data.mlm_probability as stages (hf_streamlm.data.schedule.Schedule)
        # Elastic resume (hf_streamlm.data.elastic): what this reader took over from another layout (kept while
        # a state needs it) and the documents of those passes still to read.
        self.open_reader: Callable[[dict], WorkerPipeline] | None = None  # set by the factory
        self.origin: dict | None = None
        self.prelude: Prelude | None = None

    # -- state ------------------------------------------------------------------------------------

    def _live_anchor(self) -> tuple[int, int, dict | None]:
        """The newest anchor at or before the oldest document still held (buffer or tokenizer); older
        anchors are dropped."""
        held = [d.serial for d in self.buffer]
        if self._inflight is not None:
            held += [d.serial for d in self._inflight[0]]
        oldest = min(held, default=self.read)
        while len(self.anchors) > 1 and self.anchors[1][0] <= oldest:
            self.anchors.popleft()
        return self.anchors[0] if self.anchors else (self.read, self.epoch, None)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here: positions and document references, no text."""
        pending = self._inflight[0] if self._inflight is not None else []
        anchor = self._live_anchor()
        if self.origin is not None and not needs_origin(anchor[2]):
            self.origin = None  # every handed-over document in flight is taken before the anchor: not needed again
        blocks = self.blocks + ([self.block_wait] if self.block_wait is not None else [])
        state = {
            "anchor": anchor,
            "epoch": self.epoch,
            "read": self.read,
            "pass_rows": self.pass_rows,
            "pass_done": self.pass_done,
            # Serials and content keys of the documents held, in buffer-slot / tokenizer order.
            "buffer": np.array([(d.serial, d.key) for d in self.buffer], dtype=np.uint64).reshape(-1, 2),
            "pending": np.array([(d.serial, d.key) for d in pending], dtype=np.uint64).reshape(-1, 2),
            # Arrays rather than Python objects: torch.save pickles each object through a Python hook.
            "rng": np.array(self.rng.getstate()[1], dtype=np.int64),
            "tokens": np.array(self.tokens, dtype=np.int32),  # the packing remainder: < one tokenized chunk
            "next_serial": self.next_serial,
            "doc_ends": np.array(self.doc_ends, dtype=np.uint64).reshape(-1, 4),
            "cut": self.cut,
            "batch_epoch": self.batch_epoch,
            "collate_rng": self.collate.get_rng_state() if hasattr(self.collate, "get_rng_state") else None,
            "source_docs": dict(self.source_docs),
            "source_tokens": dict(self.source_tokens),
            "skipped": self.skipped(),
            # Blocks handed over at a layout change not made yet: (block, tokens, source, key, epoch, ends) per piece.
            **encode_blocks(self.handed, "handed"),
            # The block shuffle's buffer (a waiting block of the next pass last): tokens, not references; at most
            # data.block_shuffle_size x sequence_length tokens per rank.
            **encode_packed(blocks),
            "block_wait": self.block_wait is not None,
            "block_rng": np.array(self.block_rng.getstate()[1], dtype=np.int64),
            "clock": (self.base_tokens, self.emitted),
        }
        if self.origin is not None:
            state["origin"] = self.origin
        return state

    def position(self) -> dict[str, Any]:
        """Where this reader stands in its share of the stream when it holds no document (an old reader that an
        elastic resume reads through): an anchor at ``read`` itself wherever the reading can be re-opened there."""
        anchor = self._live_anchor()  # (dropping the older ones)
        if self.prelude is not None:
            anchor = (self.read, self.epoch, {"prelude": self.prelude.position()})
        elif self._rows is not None:
            anchor = (self.read, self.epoch, self.texts.state_dict())
        elif self.pass_rows == 0 and not self._resumed_pass:
            anchor = (self.read, self.epoch, None)  # a pass not started
        return {"anchor": anchor, "read": self.read, "epoch": self.epoch, "pass_rows": self.pass_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: re-read the source from the state's anchor to where it stood,
        taking the held documents' texts on the way."""
        if "replay" in state:  # written by hf_streamlm before issue 25: rebuilt from the origin, batches replayed
            self.start_elastic(state["replay"])
            for _ in range(state["batches"]):
                self.next_batch()
            return
        if "anchor" not in state:  # handed over at a layout change, nothing made yet (ResumableLoader.load_elastic)
            self.start_elastic(state["origin"])
            return
        self.origin = state.get("origin")
        held = {int(s): int(k) for s, k in state["buffer"]}
        held.update((int(s), int(k)) for s, k in state["pending"])
        found = self._seek(state, held)
        self.pass_done = state["pass_done"]
        if self.pass_done and self.prelude is not None:
            # The writer met the end of its part of the pass, which moved the old readers on to the next pass.
            self.prelude.next(self.epoch)
        self.buffer = [found[int(s)] for s, _ in state["buffer"]]
        version, _, gauss = self.rng.getstate()
        self.rng.setstate((version, tuple(state["rng"].tolist()), gauss))
        self.tokens = state["tokens"].tolist()
        self.next_serial = state["next_serial"]
        self.doc_ends = deque(tuple(d) for d in state["doc_ends"].tolist())
        self.cut = state["cut"]
        self.batch_epoch = state["batch_epoch"]
        if state["collate_rng"] is not None:
            self.collate.set_rng_state(state["collate_rng"])
        self.source_docs = dict(state["source_docs"])
        self.source_tokens = dict(state["source_tokens"])
        self.handed = deque(decode_blocks(state, "handed"))  # (none in a state written before issue 25)
        self.blocks = decode_packed(state)
        self.block_wait = self.blocks.pop() if state.get("block_wait") else None
        if "block_rng" in state:
            version, _, gauss = self.block_rng.getstate()
            self.block_rng.setstate((version, tuple(state["block_rng"].tolist()), gauss))
        self.base_tokens, self.emitted = state.get("clock", (0, 0))
        if len(state["pending"]):
            self._submit([found[int(s)] for s, _ in state["pending"]])
        self.skipped_before = dict(state["skipped"])
        self._skips_at_start = Counter(self._skips)  # the re-read counted its skips again
        if self.skip is not None:  # what the state holds tokenized of documents skipped since it was written
            self.skip.purge(self)

    def _seek(self, state: dict[str, Any], held: dict[int, int] | None = None) -> dict[int, Doc]:
        """Re-open the reading at ``state``'s anchor and read forward to its ``read`` (no tokenizing), keeping the
        documents of ``held`` (serial -> key) met on the way; their keys are checked."""
        held = held or {}
        serial, epoch, source = state["anchor"]
        self.read, self.epoch, self.pass_rows, self.pass_done = serial, epoch, 0, False
        self.anchors.clear()
        self._rows, self._resumed_pass, self.prelude = None, False, None
        if isinstance(source, dict) and "prelude" in source:
            open_prelude(self, source["prelude"])
            self.anchors.append((serial, epoch, source))
        elif source is not None:
            self.texts.load_state_dict(source)  # applied when the pass's iteration starts
            self._resumed_pass = True
            self.anchors.append((serial, epoch, source))  # still the oldest one needed (a pass start re-adds itself)
        found: dict[int, Doc] = {}
        empty_passes = 0
        while self.read < state["read"]:
            doc = self._read()
            if doc is None:  # end of a pass inside the span
                # (A pass taken over at a layout change may hold nothing for this reader: the passes still end.)
                empty_passes = empty_passes + 1 if self.pass_rows == 0 and self.prelude is None else 0
                if empty_passes > 1:
                    break
                self._next_pass()
                continue
            if doc.serial in held:
                found[doc.serial] = doc
        missing = [s for s, k in held.items() if s not in found or found[s].key != k]
        if missing or self.read != state["read"]:
            raise ConfigError(
                f"the data source no longer holds the documents this checkpoint points at ({len(missing)} of the "
                f"{len(held)} documents in flight differ or are gone): the source changed since the checkpoint was "
                "written; pin the source's `revision` (or restore its files) to resume exactly"
            )
        self.epoch, self.pass_rows = state["epoch"], state["pass_rows"]
        return found

    def start_elastic(self, origin: dict[str, Any]) -> None:
        """Take over the part ``origin`` names of readers of another layout (see
        :mod:`hf_streamlm.data.elastic`): their documents in flight and not yet read, up to the end of
        the newest pass they had started; their blocks of packing content, merged by pass."""
        self.origin = origin
        self.base_tokens = origin.get("tokens", 0)
        held, cursors, blocks = self._take_over(origin)
        for old, _, part, _ in cursors:
            if part == 0:
                take_counts(self, old)
        # A packing remainder is a whole tokenized chunk, which can span several passes of a small share; appended
        # one old reader after the other, a later reader's first pass would wait behind the earlier readers' later
        # passes. Stable: each old reader's order kept within a pass.
        self.handed.extend(sorted(blocks, key=lambda block: block[0][3]))
        parts = [{k: v for k, v in part.items() if k not in ("snapshot", "skip")} for part in origin["parts"]]
        self.prelude = Prelude(parts, held, cursors, origin["last_epoch"])
        self.epoch = self.prelude.first_epoch
        self.anchors.append((self.read, self.epoch, {"prelude": self.prelude.position()}))

    def _take_over(self, origin: dict[str, Any]) -> tuple[dict[int, list[Doc]], list[list], list[list[tuple]]]:
        """The old readers ``origin`` names, rebuilt where they stopped, their documents in flight and packing content
        taken out: the documents in flight handed to this reader (by pass), a cursor per old reader, and this
        reader's blocks of their packing content (block ``u`` to part ``u mod k``)."""
        held: dict[int, list[Doc]] = {}
        cursors, blocks = [], []
        for part in origin["parts"]:
            old = self._rebuild(part)
            pending = old._inflight[0] if old._inflight is not None else []
            old._inflight = None
            for h, doc in enumerate(old.buffer + pending):
                if h % part["k"] == part["part"]:
                    held.setdefault(doc.epoch, []).append(doc)
            old.buffer = []
            blocks += self._ahead(old, part)
            cursors.append([old, part["k"], part["part"], 0])
        return held, cursors, blocks

    def _rebuild(self, part: dict[str, Any]) -> WorkerPipeline:
        """The old reader ``part`` names, where it stood: its snapshot loaded, the batches consumed since replayed."""
        return rebuilt(self.open_reader(part), part)

    def _ahead(self, old: WorkerPipeline, part: dict[str, Any]) -> list[list[tuple]]:
        """This reader's part of ``old``'s packing content: the blocks it would make next, block ``u`` to part
        ``u mod k``."""
        return packed_ahead(old)[part["part"]::part["k"]]

    def take_document(self) -> tuple[list[int], int, int, int] | None:
        """The next whole document, tokenized and wrapped in its separators, as ``(ids, source, key, epoch)`` (a
        pipeline that mixes sources takes them one by one: :mod:`hf_streamlm.data.mixture`); None: none left."""
        if self.handed:  # handed over at a layout change, one document each
            ((ids, source, key, epoch, _),) = self.handed.popleft()
            return ids, source, key, epoch
        while not self.doc_ends:
            if not self._fill():
                return None
        end, source, key, epoch = self.doc_ends.popleft()
        ids = self.tokens[:end - self.cut]
        del self.tokens[:end - self.cut]
        self.cut = end
        return ids, source, key, epoch

    def read_epoch(self) -> int | list[int]:
        """The pass being read (per source when sources are read on their own): how far an elastic resume must
        finish the old readers' shares."""
        return self.epoch

    def trained(self, ahead: int = 0) -> int:
        """Global tokens trained when this reader's next token, or the one ``ahead`` tokens after it, is."""
        return self.base_tokens + (self.emitted + ahead) * self.readers

    def skipped(self) -> dict[str, int]:
        """Documents skipped so far by kind (none, not_text, empty, short)."""
        total = Counter(self.skipped_before)
        total.update(self._skips - self._skips_at_start)
        return dict(total)

    # -- stages -----------------------------------------------------------------------------------

    def _read(self) -> Doc | None:
        """The next document of the pass being read; None at its end."""
        if self.prelude is not None:
            prelude = self.prelude
            if self.anchors[-1][0] != self.read and (
                self.read % ANCHOR_EVERY == 0 or self.pass_rows == 0
                # The handed-over documents in flight just ran out: from this anchor on the origin is not needed.
                or self.anchors[-1][2]["prelude"]["held_left"] and prelude.held_left() == 0
            ):
                self.anchors.append((self.read, self.epoch, {"prelude": prelude.position()}))
            taken = prelude.next(self.epoch)
            if taken is None:
                return None
            doc = Doc(taken.text, taken.source, self.read, self.epoch, taken.key)
            self.read += 1
            self.pass_rows += 1
            return doc
        if self._rows is None:
            if not self._resumed_pass:
                self.anchors.append((self.read, self.epoch, None))  # a pass start: no position needed
            self.texts.set_epoch(self.epoch)
            self._rows = iter(self.texts)
        elif self.read % ANCHOR_EVERY == 0 and (not self.anchors or self.anchors[-1][0] != self.read):
            self.anchors.append((self.read, self.epoch, self.texts.state_dict()))
        try:
            row = next(self._rows, None)
        except Exception as err:  # noqa: BLE001 - a file that cannot be read: one line naming it
            if self.describe_failure is None:
                raise
            raise ConfigError(self.describe_failure(err)) from err
        if row is None:
            return None
        text = row["text"]
        doc = Doc(text, row.get("source", 0), self.read, self.epoch, document_key(text))
        self.read += 1
        self.pass_rows += 1
        return doc

    def _next_pass(self) -> bool:
        """Start reading the next pass; False when the pass just read was empty (nothing to cycle)."""
        if self.prelude is not None:  # a pass taken over: never the end of the stream
            self.epoch += 1
            self.pass_rows, self.pass_done, self._rows = 0, False, None
            if self.epoch > self.prelude.last_epoch:
                self.prelude = None  # this reader's own share from here
            else:
                self.prelude.next_pass()
            return True
        empty = self.pass_rows == 0 and not self._resumed_pass
        self._resumed_pass = False
        if self.passes is not None and self.epoch + 1 >= self.passes:
            return False
        self.epoch += 1
        self.pass_rows = 0
        self.pass_done = False
        self._rows = None
        return not empty

    def _next_document(self) -> Doc | None:
        """Seeded shuffle buffer: fill it, then each new document takes the place of a random one. At
        the end of a pass the buffer is emptied before the next pass is read."""
        while True:
            if self.shuffle_buffer_size <= 0:
                doc = self._read()
                if doc is not None:
                    return doc
                if not self._next_pass():
                    return None
                continue
            while not self.pass_done and len(self.buffer) < self.shuffle_buffer_size:
                doc = self._read()
                if doc is None:
                    self._end_of_pass()
                    break
                self.buffer.append(doc)
            if self.buffer:
                break
            if not self._next_pass():
                return None
        i = self.rng.randrange(len(self.buffer))
        out = self.buffer[i]
        incoming = None
        if not self.pass_done:
            incoming = self._read()
            if incoming is None:
                self._end_of_pass()
        if incoming is None:
            self.buffer[i] = self.buffer[-1]
            self.buffer.pop()
        else:
            self.buffer[i] = incoming
        return out

    def _end_of_pass(self) -> None:
        self.pass_done = True
        small = 0 < self.pass_rows < self.shuffle_buffer_size
        if self.prelude is None and self.epoch == 0 and small and not self._clamp_warned:
            self._clamp_warned = True
            logger.warning(
                "data.shuffle_buffer_size: this worker's share of the stream is %d documents, fewer than its buffer "
                "of %d: the buffer is clamped to the share (each pass is shuffled whole)",
                self.pass_rows, self.shuffle_buffer_size,
            )

    def _take_documents(self) -> list[Doc]:
        docs = []
        for _ in range(self.tokenize_batch):
            doc = self._next_document()
            if doc is None:
                break
            docs.append(doc)
        return docs

    def _submit(self, docs: list[Doc]) -> None:
        """Start tokenizing ``docs`` on the helper thread. The Rust tokenizer releases the GIL, so
        reading, shuffling, packing and masking go on meanwhile in this thread."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_streamlm-tokenize")
            weakref.finalize(self, self._executor.shutdown, wait=False)
        self._inflight = (docs, self._executor.submit(self.encode, [d.text for d in docs]))

    def _fill(self) -> bool:
        """Move the next tokenized chunk into the packing buffer and start tokenizing the one after it;
        False when the stream is empty. The chunk in flight is part of the state (``pending``): its
        documents have left the shuffle buffer and come first after a resume."""
        if self._inflight is None:
            docs = self._take_documents()
            if not docs:
                return False
            self._submit(docs)
        docs, future = self._inflight
        encoded = future.result()
        following = self._take_documents()
        if following:
            self._submit(following)
        else:
            self._inflight = None
        head, tail, tokens = self.head, self.tail, self.tokens
        extra = len(head) + len(tail)
        for doc, ids in zip(docs, encoded):
            if self.skip is not None and self.skip.drops(self, doc):
                continue
            source = doc.source
            self.source_docs[source] = self.source_docs.get(source, 0) + 1
            self.source_tokens[source] = self.source_tokens.get(source, 0) + len(ids) + extra
            tokens.extend(head)
            tokens.extend(ids)
            tokens.extend(tail)
            self.next_serial += 1
            if self.documents is not None:
                self.documents.append((source, len(ids) + extra, len(doc.text.encode("utf-8"))))
            self.doc_ends.append((self.cut + len(tokens), source, doc.key, doc.epoch))
        return True

    def next_block(self) -> dict[str, list[int]] | None:
        finite = self.passes is not None  # counting a pass's blocks: their order does not matter
        cut = shuffled_block(self) if self.block_shuffle_size > 0 and not finite else cut_block(self)
        if cut is None:
            return None
        self._emitted(*cut)
        return block_of(self, *cut)

    def _emitted(self, pieces: list[tuple], pad: int) -> None:
        """A block handed out (``pieces``: see :func:`hf_streamlm.data.blocks.cut_block`)."""
        self.emitted += self.block_size

    def _block_phase(self) -> int:
        """What the block shuffle never mixes, for the block cut next: -1, its first token's pass."""
        return -1

    def next_batch(self) -> dict[str, torch.Tensor] | None:
        blocks = []
        self.batch_docs, self.batch_open = [], []
        for _ in range(self.batch_size):
            block = self.next_block()
            if block is None:
                if blocks and self.passes is not None:
                    break  # the short last batch of a finite stream
                return None
            blocks.append(block)
        if any("attention_mask" in b for b in blocks):  # one padded block: every block gets a mask
            for b in blocks:
                b.setdefault("attention_mask", [1] * self.block_size)
        if self.mlm_schedule is not None:  # the masking rate where the batch's first token is trained
            self.collate.mlm_probability = self.mlm_schedule.value_at(self.trained(-len(blocks) * self.block_size))
        batch = self.collate(blocks)
        batch["_epoch"] = self.batch_epoch
        batch["_read_epoch"] = self.read_epoch()
        self.produced += 1
        batch["_sources"] = (dict(self.source_docs), dict(self.source_tokens), self.skipped())
        if self.trace:
            batch["_docs"], batch["_open"] = self.batch_docs, self.batch_open
        return batch

