"""Assemble the stages into the training and evaluation streams of a :class:`~hf_streamlm.config.Config`.

sources -> mixture (weights) -> hold-out split -> shuffle buffer -> rank shard -> tokenize (batched
``map``) -> pack (rolling buffer) -> blocks. Collation (labels, masking) happens in the DataLoader.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from hf_streamlm.config import Config, ConfigError, SourceConfig
from hf_streamlm.data.cap import cap_per_shard
from hf_streamlm.data.packing import pack
from hf_streamlm.data.quality import TextFilter
from hf_streamlm.data.elastic import ShareStream, rebuilt
from hf_streamlm.data.sources import (ROW_BATCH, _shard_source, apply_network_settings, load_source, source_names,
                                      training_sources)
from hf_streamlm.data.loader import BlockStream, ResumableLoader
from hf_streamlm.data.mixture import MixedPipeline, SourceReader
from hf_streamlm.data.schedule import check_schedules, mixture_schedule, mlm_schedule
from hf_streamlm.data.skips import DocumentSkips
from hf_streamlm.data.stream import WorkerPipeline

logger = logging.getLogger(__name__)

TOKENIZE_BATCH = 1000
"""Documents per batched ``map`` call: large enough that the Rust tokenizer runs in parallel."""


def is_heldout(text: str, share: float) -> bool:
    """Deterministic, order-free hold-out: the same document is held out on every machine and run."""
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < share * 2**64


def open_mixture(
    config: Config, sources: list[SourceConfig] | None = None, skips_key: str = "default"
) -> datasets.IterableDataset:
    """All sources of ``config.data`` as one stream of ``{"text", "source"}`` rows, mixed by weight.
    Skipped documents are counted under ``skips_key`` (see :mod:`hf_streamlm.data.quality`)."""
    data = config.data
    apply_network_settings(data.retries, data.retry_backoff)
    if sources is None:
        sources = training_sources(config)
    streams = [load_source(s, data.cache_dir, index=i, skips_key=skips_key) for i, s in enumerate(sources)]
    if len(streams) == 1:
        ds = streams[0]
    else:
        total = sum(s.weight for s in sources)
        ds = datasets.interleave_datasets(
            streams,
            probabilities=[s.weight / total for s in sources],
            seed=config.runtime.seed,
            stopping_strategy=data.stopping_strategy,
        )
    if data.min_words:
        ds = ds.filter(TextFilter(skips_key, data.min_words), batched=True, batch_size=ROW_BATCH)
    return ds


class HeldoutFilter:
    """Batched filter keeping the held-out (or the training) documents; a class, not a lambda, so
    that the stream pickles for spawned DataLoader workers."""

    def __init__(self, share: float, heldout: bool):
        self.share, self.heldout = share, heldout

    def __call__(self, batch: dict[str, list]) -> list[bool]:
        return [is_heldout(t, self.share) == self.heldout for t in batch["text"]]


def _split(config: Config, ds: datasets.IterableDataset, heldout: bool) -> datasets.IterableDataset:
    share = config.data.eval_holdout
    if share <= 0:
        return ds
    return ds.filter(HeldoutFilter(share, heldout), batched=True, batch_size=ROW_BATCH)


def iter_rows(config: Config, limit: int | None = None, skips_key: str = "default") -> Iterator[tuple[str, int]]:
    """``(text, source index)`` of the training documents, in one process and a layout-free order (no shuffle).

    With ``data.max_samples``: the documents of one capped pass, shard after shard (:mod:`hf_streamlm.data.cap`),
    and with ``limit`` a sample of ``limit`` of them spread over the same shards (each shard's first few): a
    subset of what every layout trains on. Without a cap: the first ``limit`` documents in stream order."""
    ds = _split(config, open_mixture(config, skips_key=skips_key), heldout=False)
    if config.data.max_samples is not None:
        ds = cap_per_shard(ds, config.data.max_samples, take=limit)
    elif limit is not None:
        ds = ds.take(limit)
    for row in guarded(ds, config):
        yield row["text"], row["source"]


def guarded(rows, config: Config) -> Iterator:
    """Iterate ``rows``; a file that cannot be read becomes one line naming it (ConfigError)."""
    it = iter(rows)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - reported as one line, with the file when it is local
            raise ConfigError(describe_read_failure(config, err)) from err
        yield row


def iter_texts(config: Config, limit: int | None = None) -> Iterator[str]:
    """The training documents as :func:`iter_rows` gives them: what tokenizers are trained on."""
    return (text for text, _ in iter_rows(config, limit))


class Encoder:
    """Batched tokenization; each document wrapped in its separators: [CLS] x [SEP] or x <eos>."""

    def __init__(self, tokenizer, mlm: bool):
        self.tokenizer = tokenizer
        # The Rust tokenizer directly: the transformers wrapper converts every encoding to a Python
        # dict first, which costs about as much as the rest of the pipeline. Padding and truncation
        # are switched off on a private copy, as the wrapper does.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = copy.deepcopy(backend) if backend is not None else None
        if self.backend is not None:
            self.backend.no_padding()
            self.backend.no_truncation()
        if mlm:
            self.head, self.tail = [tokenizer.cls_token_id], [tokenizer.sep_token_id]
        else:
            self.head, self.tail = [], [tokenizer.eos_token_id]

    def __call__(self, texts: list[str], wrap: bool = True) -> list[list[int]]:
        if self.backend is not None:
            # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we never use: the same
            # ids, about 20% less work.
            encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            encoded = [e.ids for e in encode(texts, add_special_tokens=False)]
        else:
            encoded = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return [self.head + ids + self.tail for ids in encoded] if wrap else encoded


class _EncodeRows:
    def __init__(self, encode: Encoder):
        self.encode = encode

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return {"input_ids": self.encode(batch["text"])}


def _tokenize(ds: datasets.IterableDataset, tokenizer, mlm: bool) -> datasets.IterableDataset:
    return ds.map(_EncodeRows(Encoder(tokenizer, mlm)), batched=True, batch_size=TOKENIZE_BATCH,
                  remove_columns=["text"])


class PackedBlocks(torch.utils.data.IterableDataset):
    """A torch ``IterableDataset`` of packed blocks over a tokenized ``datasets`` stream.

    One iteration is one pass over the tokenized stream, in stream order: nothing here shuffles
    (the training stream's shuffle buffer is :class:`hf_streamlm.data.stream.WorkerPipeline`'s), and
    :meth:`set_epoch` only passes the pass number on to ``datasets``, which does not reorder an
    unshuffled stream for it.
    """

    def __init__(
        self,
        tokenized: datasets.IterableDataset,
        block_size: int,
        drop_last: bool,
        pad_id: int,
        with_documents: bool = False,
    ):
        self.tokenized = tokenized
        self.block_size = block_size
        self.drop_last = drop_last
        self.pad_id = pad_id
        self.with_documents = with_documents

    def set_epoch(self, epoch: int) -> None:
        self.tokenized.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        documents = (row["input_ids"] for row in self.tokenized)
        return pack(documents, self.block_size, self.drop_last, self.pad_id, self.with_documents)


class PassBlocks:
    """One pass over a rank's training stream, as the training loader reads it (the same sources,
    shuffle buffer, tokenization and packing, in this process): the blocks, for counting an epoch.
    ``documents`` holds ``(source, tokens, bytes)`` per document after a pass (``hf-streamlm stats``)."""

    def __init__(self, config: Config, tokenizer, rank: int = 0, world_size: int = 1, collator_factory=None):
        self.config, self.tokenizer, self.rank, self.world_size = config, tokenizer, rank, world_size
        self.collator_factory = collator_factory
        self.documents: list[tuple[int, int, int]] = []
        self.skips_key = ""

    def pipeline(self) -> WorkerPipeline:
        """A fresh one-pass pipeline (``batch_size`` blocks per batch, short last batch, the last block
        padded unless ``data.drop_last``)."""
        self.skips_key = f"pass-{uuid.uuid4().hex}"
        ds, _ = _rank_texts(self.config, self.rank, self.world_size, self.skips_key)
        collate = self.collator_factory or (lambda seed: _identity_collate)
        # The whole rank's buffer in this one process (no warning: the training loader gives it).
        factory = PipelineFactory(ds, self.tokenizer, self.config, self.rank, collate, self.skips_key,
                                  buffer_per_worker(self.config, self.world_size, 1, rank=-1))
        pipeline = factory(0, passes=1, pad_id=None if self.config.data.drop_last else self.tokenizer.pad_token_id)
        pipeline.documents = self.documents = []
        return pipeline

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        pipeline = self.pipeline()
        while (block := pipeline.next_block()) is not None:
            yield block


def _identity_collate(blocks: list[dict]) -> list[dict]:
    return blocks


def build_train_blocks(config: Config, tokenizer, rank: int = 0, world_size: int = 1) -> PassBlocks:
    """One pass of the rank's training blocks, through the training stream's own stages."""
    return PassBlocks(config, tokenizer, rank, world_size)


def build_eval_blocks(config: Config, tokenizer, max_blocks: int) -> list[dict[str, list[int]]]:
    """The first ``max_blocks`` held-out blocks, materialised once so every eval sees the same data."""
    data = config.data
    if data.validation_shards:
        ds = open_mixture(config, [_shard_source(data.validation_shards)])
    elif data.eval_holdout > 0:
        ds = _split(config, open_mixture(config), heldout=True)
    else:
        return []
    mlm = config.model.type == "microbert"
    blocks = PackedBlocks(
        _tokenize(ds, tokenizer, mlm), data.sequence_length, False, tokenizer.pad_token_id, data.document_masking
    )
    out = []
    for block in guarded(blocks, config):
        out.append(block)
        if len(out) >= max_blocks:
            break
    return out


class PipelineFactory:
    """Builds the :class:`WorkerPipeline` of one DataLoader worker (picklable, for spawned workers). ``layout``:
    processes x DataLoader workers, for the data schedules' clock."""

    def __init__(
        self, texts: datasets.IterableDataset, tokenizer, config: Config, rank: int, collator_factory, skips_key: str,
        buffer_per_worker: int | None = None, blocks_per_worker: int = 0, layout: tuple[int, int] = (1, 0),
    ):
        self.texts = texts
        self.skips_key = skips_key
        self.encode = Encoder(tokenizer, config.model.type == "microbert")
        self.config = config
        self.rank = rank
        self.collator_factory = collator_factory
        self.buffer_per_worker = config.data.shuffle_buffer_size if buffer_per_worker is None else buffer_per_worker
        self.blocks_per_worker = blocks_per_worker
        self.layout = layout
        self.skip = DocumentSkips.of_run(config.output_dir)  # after a rollback (runtime.spikes): hf_streamlm.data.skips

    def settings(self, worker: int, rank: int | None, settings: dict | None, passes: int | None = None,
                 pad_id: int | None = None) -> dict[str, Any]:
        """The :class:`WorkerPipeline` arguments of ``worker`` of ``rank`` (another layout's: ``settings``)."""
        d, seed = self.config.data, self.config.runtime.seed
        apply_network_settings(d.retries, d.retry_backoff)  # module settings: a spawned worker starts without them
        # Distinct, reproducible streams per (rank, worker) for the shuffle buffer and the masking.
        rank = self.rank if rank is None else rank
        settings = settings or {}
        return dict(
            # Separators are added while packing, in the reading thread: the tokenizing thread is the
            # busier one.
            encode=functools.partial(self.encode, wrap=False),
            batch_size=settings.get("batch_size", d.batch_size),
            block_size=d.sequence_length,
            shuffle_buffer_size=settings.get("buffer", self.buffer_per_worker),
            seed=seed * 1_000_003 + rank * 1009 + worker,
            with_documents=settings.get("with_documents", d.document_masking),
            separators=(self.encode.head, self.encode.tail),
            skips_key=self.skips_key,
            describe_failure=functools.partial(describe_read_failure, self.config),
            trace=d.trace_documents,
            passes=passes,
            pad_id=pad_id,
            block_shuffle_size=settings.get("blocks", self.blocks_per_worker),
        )

    def __call__(self, worker: int, passes: int | None = None, pad_id: int | None = None,
                 texts: datasets.IterableDataset | None = None, rank: int | None = None,
                 settings: dict | None = None) -> WorkerPipeline:
        kwargs = self.settings(worker, rank, settings, passes, pad_id)
        pipeline = WorkerPipeline(self.texts if texts is None else texts, collate=self.collator_factory(kwargs["seed"]),
                                  **kwargs)
        clock(pipeline, self.config, self.layout if settings is None else (settings["processes"], settings["workers"]))
        pipeline.open_reader, pipeline.skip = self.old_reader, self.skip
        return pipeline

    def old_reader(self, part: dict) -> WorkerPipeline:
        """The reader of another layout that ``part`` names (rank, worker, its layout and settings),
        rebuilt in this process for an elastic resume (:mod:`hf_streamlm.data.elastic`)."""
        ds, _ = _rank_texts(self.config, part["rank"], part["processes"], f"{self.skips_key}-elastic")
        share = ShareStream(ds, part["workers"], part["worker"])
        return self(part["worker"], texts=share, rank=part["rank"], settings=part)


def clock(pipeline: WorkerPipeline, config: Config, layout: tuple[int, int]) -> None:
    """Set ``pipeline``'s data-schedule clock: the readers of its ``layout`` (processes x DataLoader workers), and
    the masking rate's stages."""
    processes, workers = layout
    pipeline.readers = processes * max(1, workers)
    if config.model.type == "microbert":
        pipeline.mlm_schedule = mlm_schedule(config, processes)


def rank_source_texts(config: Config, rank: int, world_size: int, skips_key: str) -> list[datasets.IterableDataset]:
    """Each training source's part for ``rank`` (no shuffle yet), opened on its own; skips counted per source
    (``<skips_key>-<index>``)."""
    data = config.data
    apply_network_settings(data.retries, data.retry_backoff)
    out = []
    for i, source in enumerate(training_sources(config)):
        ds = load_source(source, data.cache_dir, index=i, skips_key=f"{skips_key}-{i}")
        if data.min_words:
            ds = ds.filter(TextFilter(f"{skips_key}-{i}", data.min_words), batched=True, batch_size=ROW_BATCH)
        ds = _split(config, ds, heldout=False)
        if world_size > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        out.append(ds)
    return out


class MixtureFactory(PipelineFactory):
    """Builds the :class:`MixedPipeline` of one DataLoader worker: a :class:`SourceReader` per source, each over
    that source's part of the rank (``texts``: a list, by source index)."""

    def __call__(self, worker: int, passes: int | None = None, pad_id: int | None = None,
                 texts: list | None = None, rank: int | None = None, settings: dict | None = None) -> MixedPipeline:
        texts = self.texts if texts is None else texts
        kwargs = self.settings(worker, rank, settings)
        layout = self.layout if settings is None else (settings["processes"], settings["workers"])
        subs = [self._source_reader(s, worker, part, rank, settings, layout) for s, part in enumerate(texts)]
        mixer = MixedPipeline(subs, mixture_schedule(self.config, layout[0]), self.config.data.mix_by == "tokens",
                              source_names(self.config), collate=self.collator_factory(kwargs["seed"]),
                              **{k: v for k, v in kwargs.items() if k not in ("encode", "skips_key")})
        clock(mixer, self.config, layout)
        mixer.open_reader, mixer.skip = self.old_reader, self.skip
        return mixer

    def _source_reader(self, s: int, worker: int, texts, rank: int | None, settings: dict | None,
                       layout: tuple[int, int]) -> SourceReader:
        kwargs = self.settings(worker, rank, settings)
        kwargs.update(seed=kwargs["seed"] * 31 + 7 * (s + 1), skips_key=f"{self.skips_key}-{s}", trace=False,
                      block_shuffle_size=0)
        sub = SourceReader(s, self._rebuilt_mixer, texts, collate=None, **kwargs)
        clock(sub, self.config, layout)
        sub.mlm_schedule, sub.skip = None, self.skip
        sub.open_reader = lambda part, s=s: self.old_source_reader(part, s)
        return sub

    def _old_texts(self, part: dict) -> list[ShareStream]:
        texts = rank_source_texts(self.config, part["rank"], part["processes"], f"{self.skips_key}-elastic")
        return [ShareStream(ds, part["workers"], part["worker"]) for ds in texts]

    def old_reader(self, part: dict) -> MixedPipeline:
        return self(part["worker"], texts=self._old_texts(part), rank=part["rank"], settings=part)

    def old_source_reader(self, part: dict, s: int) -> SourceReader:
        """Source ``s``'s reader of the old reader ``part`` names, not rebuilt (a prelude re-opens it at a position)."""
        layout = (part["processes"], part["workers"])
        return self._source_reader(s, part["worker"], self._old_texts(part)[s], part["rank"], part, layout)

    def _rebuilt_mixer(self, part: dict) -> MixedPipeline:
        return rebuilt(self.old_reader(part), part)


def describe_read_failure(config: Config, err: Exception) -> str:
    """One line for a file that could not be read: the file and line when it is local."""
    from hf_streamlm.data.quality import locate_bad_file
    from hf_streamlm.data.sources import describe_source

    sources = training_sources(config)
    for source in sources:
        where = locate_bad_file(source.data_files, source.path)
        if where:
            return f"data source '{describe_source(source)}': {where}"
    names = ", ".join(describe_source(s) for s in sources)
    causes = []  # the chain down to the root cause: "ConnectionError: Server Disconnected <- HfHubHTTPError: 429 ..."
    while err is not None and len(causes) < 3:
        first = str(err).splitlines()[0] if str(err) else ""
        causes.append(f"{type(err).__name__}: {first}")
        err = err.__cause__
    return f"could not read data source(s) {names}: " + " <- ".join(causes)


def usable_workers(n_shards: int, requested: int, rank: int = 0) -> int:
    """DataLoader workers that will get data: ``datasets`` hands each worker whole shards."""
    if requested > n_shards:
        if rank == 0:
            logger.warning(
                "data.num_workers=%d but this rank's stream has only %d shard(s): using %d worker(s). Split the data "
                "into more files (or reshard) to load in parallel.", requested, n_shards, max(n_shards, 0)
            )
        return n_shards if n_shards > 1 else 0
    return requested


def build_train_loader(
    config: Config, tokenizer, collator_factory, rank: int = 0, world_size: int = 1, pin_memory: bool = False
) -> ResumableLoader:
    """The endless, exactly resumable training batches of one rank (in pinned memory with ``pin_memory``,
    for non-blocking copies to a GPU)."""
    data = config.data
    skips_key = f"train-{uuid.uuid4().hex}"
    check_schedules(config)
    if mixture_schedule(config, world_size) is not None:  # sources read on their own, mixed at packing
        return _mixture_loader(config, tokenizer, collator_factory, rank, world_size, pin_memory, skips_key)
    ds, names = _rank_texts(config, rank, world_size, skips_key)
    workers = usable_workers(ds.num_shards, data.num_workers, rank)
    readers = world_size * max(1, workers)
    if data.max_samples is not None and data.max_samples < readers:
        raise ConfigError(
            f"data.max_samples={data.max_samples} is fewer than the {readers} readers of {names} ({world_size} rank(s) "
            f"x {max(1, workers)} DataLoader worker(s)): some would get no document; raise data.max_samples or lower "
            "data.num_workers"
        )
    factory = PipelineFactory(ds, tokenizer, config, rank, collator_factory, skips_key,
                              buffer_per_worker(config, world_size, max(1, workers), rank),
                              blocks_per_worker(config, max(1, workers)), (world_size, workers))
    return ResumableLoader(BlockStream(factory), workers, data.worker_start_method, names, rank, pin_memory)


def _mixture_loader(config: Config, tokenizer, collator_factory, rank: int, world_size: int, pin_memory: bool,
                    skips_key: str) -> ResumableLoader:
    """:func:`build_train_loader` for sources mixed along ``data.schedule`` or by tokens (:mod:`.mixture`)."""
    data = config.data
    texts = rank_source_texts(config, rank, world_size, skips_key)
    names = ", ".join(f"'{n}'" for n in source_names(config))
    workers = usable_workers(min(ds.num_shards for ds in texts), data.num_workers, rank)
    factory = MixtureFactory(texts, tokenizer, config, rank, collator_factory, skips_key,
                             buffer_per_worker(config, world_size, max(1, workers), rank),
                             blocks_per_worker(config, max(1, workers)), (world_size, workers))
    return ResumableLoader(BlockStream(factory), workers, data.worker_start_method, names, rank, pin_memory)


def _rank_texts(config: Config, rank: int, world_size: int, skips_key: str) -> tuple[datasets.IterableDataset, str]:
    """The rank's part of the training documents (no shuffle yet), and the sources' names for messages."""
    data = config.data
    names = ", ".join(f"'{n}'" for n in source_names(config))
    ds = _split(config, open_mixture(config, skips_key=skips_key), heldout=False)
    if data.max_samples is not None:
        # Per source shard, before the split: the same documents whatever the ranks and workers (not
        # `take`, whose count datasets divides over the readers).
        ds = cap_per_shard(ds, data.max_samples)
    if world_size > 1:
        if ds.num_shards % world_size and rank == 0:
            logger.warning(
                "the stream has %d shard(s), not a multiple of %d ranks: every rank reads all of it and keeps 1 "
                "example in %d (correct, but each rank downloads everything)", ds.num_shards, world_size, world_size
            )
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return ds, names


def buffer_per_worker(config: Config, world_size: int, workers: int, rank: int = 0) -> int:
    """``data.shuffle_buffer_size`` counts per rank: each of its ``workers`` shuffles in an equal part.
    With ``data.max_samples`` the share each worker reads per pass is about ``max_samples / readers`` (the
    quotas of its shards, :mod:`hf_streamlm.data.cap`), and a larger buffer is clamped to that (a pass that
    turns out smaller than the buffer is clamped while reading, too)."""
    size = config.data.shuffle_buffer_size
    if size <= 0:
        return 0
    per_worker = max(1, size // workers)
    if config.data.max_samples is not None:
        share = config.data.max_samples // (world_size * workers)
        if per_worker > share:
            if rank == 0:  # (-1: a caller that does not warn)
                logger.warning(
                    "data.shuffle_buffer_size=%d (per rank, %d per DataLoader worker) is more than each worker's "
                    "share of data.max_samples=%d (%d over %d rank(s) x %d worker(s)): clamped to %d per worker",
                    size, per_worker, config.data.max_samples, share, world_size, workers, share,
                )
            per_worker = max(1, share)
    return per_worker


def blocks_per_worker(config: Config, workers: int) -> int:
    """``data.block_shuffle_size`` counts per rank: each of its ``workers`` shuffles in an equal part."""
    size = config.data.block_shuffle_size
    return max(1, size // workers) if size > 0 else 0


def reader_settings(config: Config, processes: int, workers: int) -> dict[str, Any]:
    """What the readers of a layout (``processes`` x ``workers`` DataLoader workers) were built with beyond the
    config: rebuilt exactly at an elastic resume (:func:`hf_streamlm.data.elastic.origins`)."""
    return {"batch_size": config.data.batch_size, "sequence_length": config.data.sequence_length,
            "with_documents": config.data.document_masking,
            "buffer": buffer_per_worker(config, processes, max(1, workers), rank=-1),
            "blocks": blocks_per_worker(config, max(1, workers))}
