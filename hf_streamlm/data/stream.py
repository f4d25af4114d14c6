"""The training stream with exact, cheap resume.

``datasets`` keeps the position of its sources, mixture and ``map``/``filter`` stages
(``IterableDataset.state_dict``), but its shuffle buffer comes back empty on resume (measured with
datasets 5.2: a resumed stream repeated and skipped examples). So the stages that hold data live
here, with their own state: the shuffle buffer (contents and RNG), the packing remainder, the
collator's RNG. ``datasets`` below them is used without its shuffle.

One :class:`WorkerPipeline` runs per rank and DataLoader worker (``datasets`` gives each worker its
own shards). A worker attaches a snapshot of its state to every ``snapshot_every``-th batch; the
:class:`ResumableLoader` in the training process keeps, per worker, the newest snapshot it has
consumed and how many batches that worker produced since. Resuming loads the snapshot and replays
at most ``snapshot_every - 1`` batches: the cost does not grow with the position in the stream.
With ``num_workers=0`` the pipeline runs in the training process and its state is read directly
when a checkpoint is written: no snapshots at all.
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
import torch
from torch.utils.data import DataLoader

from hf_streamlm.config import ConfigError
from hf_streamlm.data.packing import document_positions
from hf_streamlm.data.quality import skip_counter

logger = logging.getLogger(__name__)

SNAPSHOT_EVERY = 16
"""Batches between state snapshots sent from a DataLoader worker (bounds the replay on resume)."""


class WorkerPipeline:
    """shuffle buffer -> batched tokenization -> packing -> collation, over a ``datasets`` text stream.

    The text stream is cycled forever (one pass = one epoch, reshuffled by ``set_epoch``), so a
    worker never runs dry while its peers still produce and the round-robin order of the
    DataLoader stays fixed.
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
    ):
        # A private copy: `datasets` keeps the epoch in shared memory so that persistent workers follow
        # the main process; here each worker runs its own passes and must not move its peers' epoch.
        self.texts = copy.deepcopy(texts)
        self.encode = encode
        self.collate = collate
        self.batch_size = batch_size
        self.block_size = block_size
        self.shuffle_buffer_size = shuffle_buffer_size
        self.with_documents = with_documents
        self.tokenize_batch = tokenize_batch
        self.head, self.tail = separators  # wrapped around each document: [CLS] x [SEP] or x <eos>
        self.describe_failure = describe_failure
        # Skipped documents: counted by the source filters in this process; carried in the state.
        self._skips = skip_counter(skips_key)
        self._skips_at_start = Counter(self._skips)
        self.skipped_before: dict[str, int] = {}
        self.rng = random.Random(seed)
        self.epoch = 0
        self.buffer: list[tuple[str, int]] = []  # (text, source index)
        self.source_docs: dict[int, int] = {}  # documents and tokens tokenized so far, per source
        self.source_tokens: dict[int, int] = {}
        self.tokens: list[int] = []
        self.serials: list[int] = []  # document serial of each buffered token (with_documents)
        self.next_serial = 0
        self._rows: Iterator[dict] | None = None
        self._rows_this_epoch = 0
        self._source_resumed = False  # a pass resumed at its very end yields no rows yet is not empty
        self._fresh_pass = True
        self._loaded_source: dict | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: tuple[list[tuple[str, int]], Future] | None = None

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here. Lists are copied (their items are immutable)."""
        return {
            "epoch": self.epoch,
            # Until this pass starts reading, the source is where the loaded state left it.
            "source": self.texts.state_dict() if self._rows is not None else self._loaded_source,
            "buffer": list(self.buffer),
            "rng": self.rng.getstate(),
            "tokens": list(self.tokens),
            "serials": list(self.serials),
            "next_serial": self.next_serial,
            "collate_rng": self.collate.get_rng_state() if hasattr(self.collate, "get_rng_state") else None,
            "source_docs": dict(self.source_docs),
            "source_tokens": dict(self.source_tokens),
            "pending": list(self._inflight[0]) if self._inflight is not None else [],
            "skipped": self.skipped(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        if state["source"] is not None:
            self.texts.load_state_dict(state["source"])  # applied when the epoch's iteration starts
            self._source_resumed = True
        self._loaded_source = state["source"]
        self.buffer = list(state["buffer"])
        self.rng.setstate(state["rng"])
        self.tokens = list(state["tokens"])
        self.serials = list(state["serials"])
        self.next_serial = state["next_serial"]
        if state["collate_rng"] is not None:
            self.collate.set_rng_state(state["collate_rng"])
        self.source_docs = dict(state["source_docs"])
        self.source_tokens = dict(state["source_tokens"])
        if state["pending"]:
            self._submit(list(state["pending"]))
        self.skipped_before = dict(state["skipped"])
        self._skips_at_start = Counter(self._skips)

    def skipped(self) -> dict[str, int]:
        """Documents skipped so far by kind (none, not_text, empty, short)."""
        total = Counter(self.skipped_before)
        total.update(self._skips - self._skips_at_start)
        return dict(total)

    # -- stages -----------------------------------------------------------------------------------

    def _next_text(self) -> tuple[str, int] | None:
        """The next document of the source, moving on to the next epoch at the end of a pass."""
        while True:
            if self._rows is None:
                self.texts.set_epoch(self.epoch)
                self._rows = iter(self.texts)
                self._rows_this_epoch = 0
                self._fresh_pass, self._source_resumed = not self._source_resumed, False
                self._loaded_source = None
            try:
                row = next(self._rows, None)
            except Exception as err:  # noqa: BLE001 - a file that cannot be read: one line naming it
                if self.describe_failure is None:
                    raise
                raise ConfigError(self.describe_failure(err)) from err
            if row is not None:
                self._rows_this_epoch += 1
                return row["text"], row.get("source", 0)
            if self._rows_this_epoch == 0 and self._fresh_pass:
                return None  # a whole pass yielded nothing: this worker's share is empty
            self.epoch += 1
            self._rows = None

    def _next_document(self) -> tuple[str, int] | None:
        """Seeded shuffle buffer: fill it, then each new document takes the place of a random one."""
        if self.shuffle_buffer_size <= 0:
            return self._next_text()
        while len(self.buffer) < self.shuffle_buffer_size:
            text = self._next_text()
            if text is None:
                break
            self.buffer.append(text)
        if not self.buffer:
            return None
        i = self.rng.randrange(len(self.buffer))
        out = self.buffer[i]
        incoming = self._next_text() if len(self.buffer) == self.shuffle_buffer_size else None
        if incoming is None:
            self.buffer[i] = self.buffer[-1]
            self.buffer.pop()
        else:
            self.buffer[i] = incoming
        return out

    def _take_documents(self) -> list[tuple[str, int]]:
        docs = []
        for _ in range(self.tokenize_batch):
            doc = self._next_document()
            if doc is None:
                break
            docs.append(doc)
        return docs

    def _submit(self, docs: list[tuple[str, int]]) -> None:
        """Start tokenizing ``docs`` on the helper thread. The Rust tokenizer releases the GIL, so
        reading, shuffling, packing and masking go on meanwhile in this thread."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_streamlm-tokenize")
            weakref.finalize(self, self._executor.shutdown, wait=False)
        self._inflight = (docs, self._executor.submit(self.encode, [text for text, _ in docs]))

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
        for (_, source), ids in zip(docs, encoded):
            self.source_docs[source] = self.source_docs.get(source, 0) + 1
            self.source_tokens[source] = self.source_tokens.get(source, 0) + len(ids) + extra
            tokens.extend(head)
            tokens.extend(ids)
            tokens.extend(tail)
            if self.with_documents:
                self.serials.extend([self.next_serial] * (len(ids) + extra))
            self.next_serial += 1
        return True

    def next_block(self) -> dict[str, list[int]] | None:
        while len(self.tokens) < self.block_size:
            if not self._fill():
                return None
        block = {"input_ids": self.tokens[: self.block_size]}  # full blocks: the collator adds the all-ones mask
        del self.tokens[: self.block_size]
        if self.with_documents:
            block["position_ids"], block["document_ids"] = document_positions(self.serials[: self.block_size])
            del self.serials[: self.block_size]
        return block

    def next_batch(self) -> dict[str, torch.Tensor] | None:
        blocks = []
        for _ in range(self.batch_size):
            block = self.next_block()
            if block is None:
                return None
            blocks.append(block)
        batch = self.collate(blocks)
        batch["_epoch"] = self.epoch
        batch["_sources"] = (dict(self.source_docs), dict(self.source_tokens), self.skipped())
        return batch


class BlockStream(torch.utils.data.IterableDataset):
    """Batches of one rank: a :class:`WorkerPipeline` per DataLoader worker, resumable from
    per-worker snapshots (see the module docstring)."""

    def __init__(self, make_pipeline: Callable[[int], WorkerPipeline], snapshot_every: int = SNAPSHOT_EVERY):
        self.make_pipeline = make_pipeline
        self.snapshot_every = snapshot_every
        self.resume: dict[int, dict[str, Any]] = {}
        self.live: WorkerPipeline | None = None  # the pipeline, when it runs in this process

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        # In this process the loader reads the state from the live pipeline when asked; only worker
        # processes need to send snapshots along with their batches.
        every = self.snapshot_every if info else None
        pipeline = self.make_pipeline(worker)
        if info is None:
            self.live = pipeline
        start = self.resume.get(worker)
        if start is not None:
            pipeline.load_state_dict(start["snapshot"])
            for _ in range(start["skip"]):  # replay what was consumed after the snapshot
                pipeline.next_batch()
        produced = 0
        while (batch := pipeline.next_batch()) is not None:
            batch["_worker"] = worker
            if every is not None and produced % every == 0:
                batch["_state"] = pipeline.state_dict()
            produced += 1
            yield batch


def _identity(batch: dict) -> dict:
    return batch


class ResumableLoader:
    """A DataLoader over a :class:`BlockStream` whose ``state_dict`` marks exactly the batches consumed.

    The DataLoader asks its workers in turn (0, 1, ..., 0, 1, ...); since every worker's stream is
    endless, batch ``i`` always comes from worker ``i % num_workers``. After a resume the loader
    starts again at worker 0, so batches are re-ordered here to continue the turn where it stopped.
    """

    def __init__(self, stream: BlockStream, num_workers: int = 0):
        self.stream = stream
        self.num_workers = num_workers
        self.workers: dict[int, dict[str, Any]] = {}
        self.next_worker = 0
        self.epoch = 0
        self.sources: dict[int, tuple[dict, dict]] = {}  # per worker: cumulative (docs, tokens) by source

    def state_dict(self) -> dict[str, Any]:
        if self.num_workers == 0 and self.stream.live is not None:
            # No prefetching without workers: the live pipeline has produced exactly the batches consumed.
            self.workers[0] = {"snapshot": self.stream.live.state_dict(), "skip": 0}
        return {
            "num_workers": self.num_workers,
            "next_worker": self.next_worker,
            "workers": copy.deepcopy(self.workers),
            "sources": copy.deepcopy(self.sources),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_workers"] != self.num_workers:
            raise ValueError(
                f"the checkpoint's data state is for data.num_workers={state['num_workers']}, not {self.num_workers}: "
                "resume with the same number of workers"
            )
        self.workers = copy.deepcopy(state["workers"])
        self.next_worker = state["next_worker"]
        self.sources = copy.deepcopy(state["sources"])

    def source_counts(self) -> tuple[dict[int, int], dict[int, int]]:
        """Documents and tokens tokenized so far, per source index, summed over this rank's workers."""
        docs: dict[int, int] = {}
        tokens: dict[int, int] = {}
        for worker_docs, worker_tokens, _ in self.sources.values():
            for source, n in worker_docs.items():
                docs[source] = docs.get(source, 0) + n
            for source, n in worker_tokens.items():
                tokens[source] = tokens.get(source, 0) + n
        return docs, tokens

    def skip_counts(self) -> dict[str, int]:
        """Documents skipped so far by kind, summed over this rank's workers."""
        total: Counter = Counter()
        for _, _, skipped in self.sources.values():
            total.update(skipped)
        return dict(total)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.stream.resume = copy.deepcopy(self.workers)
        self.stream.live = None
        # Batches are made by the pipeline; the identity collate keeps the snapshots as they are
        # (the default conversion would turn the RNG's tuples into lists).
        loader = iter(DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity))
        try:
            yield from self._in_turn(loader)
        finally:
            # Workers stopped now, not whenever the iterator is collected: a worker error's traceback keeps
            # it alive until exit, where multiprocessing's SIGTERM cannot stop workers that block it
            # (hf_streamlm.train.signals) and its join would wait forever.
            getattr(loader, "_shutdown_workers", lambda: None)()

    def _in_turn(self, loader) -> Iterator[dict[str, torch.Tensor]]:
        turns = max(1, self.num_workers)
        pending: dict[int, deque] = {w: deque() for w in range(turns)}
        for batch in loader:
            pending[batch["_worker"]].append(batch)
            while pending[self.next_worker]:
                out = pending[self.next_worker].popleft()
                worker = out.pop("_worker")
                snapshot = out.pop("_state", None)
                if snapshot is not None:
                    self.workers[worker] = {"snapshot": snapshot, "skip": 0}
                elif self.num_workers:
                    self.workers[worker]["skip"] += 1
                self.epoch = out.pop("_epoch")
                self.sources[worker] = out.pop("_sources")
                self.next_worker = (self.next_worker + 1) % turns
                yield out
