"""A capped pass that holds the same documents on every layout (``data.max_samples``, a source's
``max_samples``).

``IterableDataset.take(n)`` cannot be the cap: ``datasets`` splits ``n`` over the readers the stream is
sharded to (``TakeExamplesIterable.shard_data_sources``, datasets 5.2), so each reader takes the first
``n / readers`` documents of *its* shards and the documents of a pass depend on the number of ranks and
DataLoader workers (8 shards of 12 documents, ``n = 40``: 1 rank and 4 ranks shared 34 documents; an
elastic resume of ``runpod_1b`` trained another million). The cap is defined on the finest unit
``datasets`` hands to ranks and workers instead, the **source shard**, whoever reads it:

- The stream's ``S`` shards are numbered as ``datasets`` lists them. The first ``U`` of them contribute,
  ``U = min(S, max(MIN_CAPPED_SHARDS, the largest power of two <= n // DOCS_PER_CAPPED_SHARD))``: every
  shard up to 64 shards, and on streams of thousands of files (FineWeb) enough shards for about 1,024
  documents or more each, so a pass does not open every file of a Hub dataset for a few documents each
  (``runpod_1b``: 512 of FineWeb's files, about 1,953 documents from each). A power of two divides the usual rank
  and worker counts, so the ranks still split whole shards.
- Shard ``j < U`` contributes its first ``q_j = n // U + (j < n % U)`` documents, counted after the
  filters (empty text, ``min_words``, hold-out). A shard that holds fewer makes the pass shorter by the
  difference (said once per process): the others cannot know, since nothing is counted across readers.
- A mixture (``interleave_datasets``) has as many shards as its source with the fewest; its shard ``j``
  is shard ``j`` of every source (a source with more shards gives a contiguous group), mixed by weight
  with a generator seeded from the mixture's seed and ``j`` alone. The documents drawn from each source
  in shard ``j`` therefore do not depend on the reader, and neither does the pass: the same documents
  from each source on every layout. (``datasets`` seeds a mixture per reader and per pass; under a cap
  the mixture is fixed per shard, so every pass holds the same documents, in a new shuffle order.)
- ``n' <= n`` documents of the pass (the tokenizer's sample) are ``q'_j = n' // U + (j < n' % U)`` from
  the same ``U`` shards: each shard's first ``q'_j <= q_j``, a subset of the pass, spread over its shards.

:class:`CappedShards` is an ``ExamplesIterable``: sharding it (ranks, DataLoader workers, an elastic
resume's :class:`~hf_streamlm.data.elastic.ShareStream`) hands out whole shards with their quotas, and its
state (shard, documents taken, the shard's own state) resumes mid-pass.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import datasets
from datasets.iterable_dataset import DataSourcesShufflingDisallowed, _BaseExamplesIterable, shift_ex_examples_rngs

from hf_streamlm.config import ConfigError

logger = logging.getLogger(__name__)

MIN_CAPPED_SHARDS = 64
"""Shards a capped pass uses at least (all of them when the stream has fewer): ``runpod_1b``'s 8 ranks x 8
workers each get one."""

DOCS_PER_CAPPED_SHARD = 1024
"""Beyond ``MIN_CAPPED_SHARDS``, a capped pass uses as many shards as give about this many documents each
or more: opening a Hub file costs requests and a row group whatever is read from it."""

_short: set[tuple[str, int, int]] = set()  # shards already reported short in this process


def capped_shards(num_shards: int, cap: int) -> int:
    """``U``: how many of a stream's first shards a pass capped at ``cap`` documents reads from."""
    per_shard = cap // DOCS_PER_CAPPED_SHARD
    power = 1 << (per_shard.bit_length() - 1) if per_shard else 0
    return min(num_shards, max(MIN_CAPPED_SHARDS, power))


def shard_quotas(num_shards: int, cap: int, take: int | None = None) -> list[int]:
    """Documents each contributing shard gives to a pass capped at ``cap``; with ``take <= cap``, to a
    sample of ``take`` documents of that pass (the same shards, each a prefix of its part of the pass)."""
    units = capped_shards(num_shards, cap)
    n = cap if take is None else min(take, cap)
    return [n // units + (j < n % units) for j in range(units)]


def cap_per_shard(
    ds: datasets.IterableDataset, cap: int, take: int | None = None, what: str = "data.max_samples"
) -> datasets.IterableDataset:
    """``ds`` capped at ``cap`` documents per pass by the per-shard rule (module doc); with ``take``, a
    sample of ``take`` of them by the same rule. ``ds`` must not be split by node yet. ``what`` names the
    cap in messages."""
    if ds._distributed is not None:
        raise ValueError("cap_per_shard: cap the stream before split_dataset_by_node")
    return datasets.IterableDataset(
        ex_iterable=CappedShards(ds._ex_iterable, shard_quotas(ds.num_shards, cap, take), what=what),
        info=ds._info.copy(),
        split=ds._split,
        formatting=ds._formatting,
        token_per_repo_id=ds._token_per_repo_id,
    )


class CappedShards(_BaseExamplesIterable):
    """The first ``quotas[j]`` documents of shard ``j`` of ``stream``, for the shards in ``units``, one
    shard after the other.

    ``stream`` is kept whole (each shard is cut from it when it is read), so a shard means the same
    documents however the units are dealt to readers. It is not an ``ex_iterable`` attribute on purpose:
    ``datasets`` re-seeds every generator it reaches that way per reader and per pass
    (``shift_ex_examples_rngs``); a shard's mixture generator is seeded from its index alone instead."""

    def __init__(self, stream: _BaseExamplesIterable, quotas: list[int], units: list[int] | None = None,
                 what: str = "data.max_samples"):
        super().__init__()
        self.what = what
        self.stream = stream
        self.stream_shards = stream.num_shards
        self.quotas = list(quotas)
        self.units = list(range(len(self.quotas))) if units is None else list(units)

    @property
    def num_shards(self) -> int:
        return len(self.units)

    @property
    def is_typed(self) -> bool:
        return self.stream.is_typed

    @property
    def features(self):
        return self.stream.features

    @property
    def sleep_on_threads_shutdown(self) -> bool:
        return self.stream.sleep_on_threads_shutdown

    def _init_state_dict(self) -> dict:
        # The shard being read (its position in `units`), the documents taken from it, its own state.
        self._state_dict = {"unit": 0, "taken": 0, "examples_iterable": None, "type": type(self).__name__}
        return self._state_dict

    def shard(self, unit: int) -> _BaseExamplesIterable:
        """Shard ``unit`` of the whole stream, its generators (a mixture's) seeded from ``unit``."""
        one = self.stream.shard_data_sources(num_shards=self.stream_shards, index=unit, contiguous=True)
        return shift_ex_examples_rngs(one, unit)

    def __iter__(self) -> Iterator[tuple]:
        state = self._state_dict
        if state is not None and state.get("type") != type(self).__name__:
            # A position saved by `take` (before the cap was per shard) points into another set of documents.
            raise ConfigError(
                f"the checkpoint's stream position was written when {self.what} was a `take` of the stream's first "
                "documents; the capped pass is now per source shard (other documents): resume with the version that "
                "wrote the checkpoint, or start a new runtime.output_dir"
            )
        position = state["unit"] if state is not None else 0
        taken = state["taken"] if state is not None else 0
        saved = state["examples_iterable"] if state is not None else None
        while position < len(self.units):
            unit = self.units[position]
            quota = self.quotas[unit]
            if taken < quota:
                shard = self.shard(unit)
                if state is not None:
                    if saved is not None:
                        shard.load_state_dict(saved)
                    else:
                        shard._init_state_dict()
                    state["examples_iterable"] = shard._state_dict  # live: it moves as the shard is read
                for key_example in shard:
                    taken += 1
                    if state is not None:
                        state["taken"] = taken
                    yield key_example
                    if taken >= quota:
                        break
                else:
                    self._report_short(unit, taken, quota)
            position, taken, saved = position + 1, 0, None
            if state is not None:
                state.update(unit=position, taken=0, examples_iterable=None)

    def _report_short(self, unit: int, taken: int, quota: int) -> None:
        if (self.what, unit, self.stream_shards) in _short:
            return
        _short.add((self.what, unit, self.stream_shards))
        logger.warning(
            "%s: shard %d of %d of the stream holds %d of its %d documents of the capped pass (after "
            "filters): each pass is %d documents shorter (the cap is per shard, the same on every layout)",
            self.what, unit, self.stream_shards, taken, quota, quota - taken,
        )

    def shuffle_data_sources(self, generator) -> CappedShards:
        raise DataSourcesShufflingDisallowed()  # a shard's quota belongs to that shard: the order stays fixed

    def shard_data_sources(self, num_shards: int, index: int, contiguous: bool = True) -> CappedShards:
        picked = self.split_shard_indices_by_worker(num_shards, index, contiguous=contiguous)
        return CappedShards(self.stream, self.quotas, [self.units[i] for i in picked], self.what)

    def reshard_data_sources(self) -> CappedShards:
        return self  # the quotas are per shard: splitting shards further would change the pass
