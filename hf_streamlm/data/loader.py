"""The training process's side of the stream: the rank's :class:`BlockStream` (one
:class:`~hf_streamlm.data.stream.WorkerPipeline` per DataLoader worker) and the
:class:`ResumableLoader` that keeps, per worker, the newest state snapshot consumed, so a checkpoint
holds where every worker stood (see :mod:`hf_streamlm.data.stream` for what that state is)."""

from __future__ import annotations

import copy
import logging
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from hf_streamlm.config import ConfigError
from hf_streamlm.data.stream import SNAPSHOT_EVERY, WorkerPipeline

logger = logging.getLogger(__name__)

class BlockStream(torch.utils.data.IterableDataset):
    """Batches of one rank: a :class:`WorkerPipeline` per DataLoader worker, resumable from
    per-worker snapshots (see the module docstring). A worker whose share of the stream is empty
    sends one ``{"_empty": True}`` marker and stops, so the loader drops it from its turns instead of
    waiting on it."""

    def __init__(self, make_pipeline: Callable[[int], WorkerPipeline], snapshot_every: int = SNAPSHOT_EVERY):
        self.make_pipeline = make_pipeline
        self.snapshot_every = snapshot_every
        self.resume: dict[int, dict[str, Any]] = {}
        self.live: WorkerPipeline | None = None  # the pipeline, when it runs in this process

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        if info is not None:
            # A forked worker must not use the tokenizer's Rust thread pool: its threads stayed in the
            # parent, and with TOKENIZERS_PARALLELISM=true (which disables the library's own fork guard)
            # encode_batch would wait on them forever. Each worker encodes on its own thread instead.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
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
        if produced == 0 and start is None:
            yield {"_worker": worker, "_empty": True}


def _identity(batch: dict) -> dict:
    return batch


class ResumableLoader:
    """A DataLoader over a :class:`BlockStream` whose ``state_dict`` marks exactly the batches consumed.

    The DataLoader asks its workers in turn (0, 1, ..., 0, 1, ...); since every worker's stream is
    endless, batch ``i`` always comes from worker ``i % num_workers``. After a resume the loader
    starts again at worker 0, so batches are re-ordered here to continue the turn where it stopped.
    A worker with an empty share leaves the turns (its marker comes at its first turn, so the order
    stays fixed); when every worker of the rank is empty, the rank has nothing to train on and the
    loader stops with one line naming the sources.
    """

    def __init__(self, stream: BlockStream, num_workers: int = 0, start_method: str | None = None,
                 describe_sources: str = "the data sources", rank: int = 0, pin_memory: bool = False):
        self.stream = stream
        self.pin_memory = pin_memory  # the DataLoader's pinning thread: batches in page-locked memory (CUDA)
        self.num_workers = num_workers
        self.start_method = start_method
        self.describe_sources = describe_sources
        self.rank = rank
        self.workers: dict[int, dict[str, Any]] = {}
        self.turns = list(range(max(1, num_workers)))  # the workers that produce, in turn order
        self.next_worker = 0
        self.epoch = 0
        self.docs: list[list] = []  # with data.trace_documents: documents that ended in the batches handed out
        # ... and those with tokens in them that end later: the last step's (step_open), for a rollback after spikes.
        self.open: list[list] = []
        self.step_open: list[list] = []
        self.sources: dict[int, tuple[dict, dict]] = {}  # per worker: cumulative (docs, tokens) by source
        self.read_epochs: dict[int, int] = {}  # per worker: the pass it was reading when its last batch was made

    def state_dict(self) -> dict[str, Any]:
        if self.num_workers == 0 and self.stream.live is not None:
            # No prefetching without workers: the live pipeline has produced exactly the batches consumed.
            self.workers[0] = {"snapshot": self.stream.live.state_dict(), "skip": 0}
            self.read_epochs[0] = self.stream.live.read_epoch()
        return {
            "num_workers": self.num_workers,
            "next_worker": self.next_worker,
            "turns": list(self.turns),
            "epoch": self.epoch,
            "workers": copy.deepcopy(self.workers),
            "sources": copy.deepcopy(self.sources),
            "read_epochs": dict(self.read_epochs),
        }

    def mark(self) -> None:
        """Remember where the loader stands (an optimizer step's start), for :meth:`rewind`. Cheap with
        DataLoader workers: the snapshots received are never changed in place, so the mark holds references
        and the replay counts. Without workers the live pipeline's state is taken (one ``state_dict`` per
        optimizer step): a read failure can leave that pipeline in the middle of a batch."""
        live = None
        if self.num_workers == 0 and self.stream.live is not None:
            live = {"snapshot": self.stream.live.state_dict(), "skip": 0}, self.stream.live.read_epoch()
        self._mark = {
            "workers": {w: dict(entry) for w, entry in self.workers.items()}, "live": live,
            "next_worker": self.next_worker, "turns": list(self.turns), "epoch": self.epoch,
            "sources": dict(self.sources), "read_epochs": dict(self.read_epochs), "docs": len(self.docs),
        }

    def rewind(self) -> None:
        """Go back to the last :meth:`mark`: the batches consumed since are forgotten, so :meth:`state_dict`
        says the stream continues with the first of them (a read failure after some micro-batches of a step
        were fetched: a resume trains the whole step). Only the state goes back; the iterator does not."""
        mark = getattr(self, "_mark", None)
        if mark is None:
            return
        self.workers, self.read_epochs = mark["workers"], mark["read_epochs"]
        if mark["live"] is not None:
            self.workers[0], self.read_epochs[0] = mark["live"]
            self.stream.live = None  # state_dict must not read the live pipeline, which is past the mark
        self.next_worker, self.turns, self.epoch = mark["next_worker"], mark["turns"], mark["epoch"]
        self.sources = mark["sources"]
        del self.docs[mark["docs"]:]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_workers"] != self.num_workers:
            raise ConfigError(
                f"the checkpoint's data state is for data.num_workers={state['num_workers']}, not {self.num_workers}: "
                "resume with the same number of workers"
            )
        # ("origin": a reader just handed over at a layout change; "replay": one still in the passes it took over,
        # as hf_streamlm wrote it before issue 25.)
        if any(not {"anchor", "origin", "replay"} & set(w["snapshot"]) for w in state["workers"].values()):
            raise ConfigError("the checkpoint's data state was written by an older hf_streamlm (text in the state): "
                              "resume it with the version that wrote it, or start a new runtime.output_dir")
        self.workers = copy.deepcopy(state["workers"])
        self.next_worker = state["next_worker"]
        self.turns = list(state.get("turns", range(max(1, self.num_workers))))
        self.epoch = state.get("epoch", 0)
        self.sources = copy.deepcopy(state["sources"])
        self.read_epochs = dict(state.get("read_epochs", {}))

    def load_elastic(self, origins: dict[int, dict[str, Any]], epoch: int) -> None:
        """Start from what an elastic resume hands this rank's workers (``hf_streamlm.data.elastic.origins``)."""
        self.workers = {w: {"snapshot": {"origin": origin}, "skip": 0} for w, origin in origins.items()}
        self.next_worker = 0
        self.turns = list(range(max(1, self.num_workers)))
        self.epoch = epoch
        self.sources = {}
        self.read_epochs = {}

    def take_documents(self) -> list[list]:
        """``[source_index, key, epoch]`` of the documents whose last token was in the batches handed out
        since the last call (``data.trace_documents``): an optimizer step's, called once per step."""
        docs, self.docs = self.docs, []
        self.step_open, self.open = self.open, []
        return docs

    def source_counts(self) -> tuple[dict[int, int], dict[int, int]]:
        """Documents and tokens tokenized so far, per source index, summed over this rank's workers."""
        docs: dict[int, int] = {}
        tokens: dict[int, int] = {}
        for worker_docs, worker_tokens, *_ in self.sources.values():
            for source, n in worker_docs.items():
                docs[source] = docs.get(source, 0) + n
            for source, n in worker_tokens.items():
                tokens[source] = tokens.get(source, 0) + n
        return docs, tokens

    def skip_counts(self) -> dict[str, int]:
        """Documents skipped so far by kind, summed over this rank's workers."""
        total: Counter = Counter()
        for counts in self.sources.values():
            total.update(counts[2])
        return dict(total)

    def mixture(self) -> tuple[int, dict[int, dict[int, int]], int] | None:
        """With sources mixed along a schedule (:mod:`hf_streamlm.data.mixture`): the stage trained now, the tokens
        handed out per stage and source summed over this rank's workers, and the schedule's stages; None otherwise."""
        mixes = [counts[3] for counts in self.sources.values() if len(counts) > 3]
        if not mixes:
            return None
        total: dict[int, dict[int, int]] = {}
        for mix in mixes:
            for stage, counts in mix["stage_tokens"].items():
                mine = total.setdefault(stage, {})
                for source, n in counts.items():
                    mine[source] = mine.get(source, 0) + n
        return max(mix["stage"] for mix in mixes), total, mixes[0]["stages"]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.stream.resume = copy.deepcopy(self.workers)
        self.stream.live = None
        # Batches are made by the pipeline; the identity collate keeps the snapshots as they are
        # (the default conversion would turn the RNG's tuples into lists).
        context = self.start_method if self.num_workers and self.start_method else None
        loader = iter(DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                                 multiprocessing_context=context, pin_memory=self.pin_memory))
        try:
            yield from self._in_turn(loader)
        finally:
            # Workers stopped now, not whenever the iterator is collected: a worker error's traceback keeps
            # it alive until exit, where multiprocessing's SIGTERM cannot stop workers that block it
            # (hf_streamlm.train.signals) and its join would wait forever.
            getattr(loader, "_shutdown_workers", lambda: None)()

    def _in_turn(self, loader) -> Iterator[dict[str, torch.Tensor]]:
        pending: dict[int, deque] = {w: deque() for w in range(max(1, self.num_workers))}
        for batch in loader:
            pending[batch["_worker"]].append(batch)
            while self.turns and pending[self.turns[self.next_worker]]:
                out = pending[self.turns[self.next_worker]].popleft()
                worker = out.pop("_worker")
                if out.get("_empty"):
                    self.turns.remove(worker)  # this worker's share is empty: its peers carry on
                    logger.warning("rank %d: DataLoader worker %d has no documents of %s; the other workers carry "
                                   "on", self.rank, worker, self.describe_sources)
                    self.next_worker = self.next_worker % len(self.turns) if self.turns else 0
                    continue
                snapshot = out.pop("_state", None)
                if snapshot is not None:
                    self.workers[worker] = {"snapshot": snapshot, "skip": 0}
                elif self.num_workers:
                    self.workers[worker]["skip"] += 1
                self.epoch = out.pop("_epoch")
                self.read_epochs[worker] = out.pop("_read_epoch")
                self.docs.extend(out.pop("_docs", ()))
                self.open.extend(out.pop("_open", ()))
                self.sources[worker] = out.pop("_sources")
                self.next_worker = (self.next_worker + 1) % len(self.turns)
                yield out
            if not self.turns:
                break
        if not self.turns:
            raise ConfigError(f"rank {self.rank} has no documents to train on: {self.describe_sources} gave its "
                              "DataLoader workers nothing (fewer shards or documents than ranks x workers, or "
                              "everything filtered out)")
