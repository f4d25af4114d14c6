"""Sources: one ``datasets.IterableDataset`` per configured source, reduced to a ``text`` column
and a ``source`` column (the source's index in ``data.sources``, for per-source counts).

A source may list ``fallbacks`` (seed 000's chain: wikitext, wikipedia, openwebtext, c4, pile-cc,
then IMDB): they are tried in order, and the one in use is logged with why the others failed.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import datasets

from hf_streamlm.config import ConfigError, SourceConfig, build
from hf_streamlm.data.cap import cap_per_shard
from hf_streamlm.data.corpus import BUILTIN_CORPORA
from hf_streamlm.data.quality import TextFilter

logger = logging.getLogger(__name__)

# Rows per call of the batched per-document stages (text filter, source column, hold-out split).
# datasets turns each batch's per-row keys into strings, a cost that grows with the batch; 16 keeps
# the stages at ~1.1x a plain Python loop (benchmarks/bench_tokenizer.py) where the default 1000 was 2.3x.
ROW_BATCH = 16

_reported: set[str] = set()  # fallback choices already logged in this process (the stream is opened several times)

FILE_BUILDERS = ("json", "parquet", "text", "csv", "arrow")


def apply_network_settings(retries: int, backoff: float) -> None:
    """Retry count and backoff of ``datasets``' remote reads and opens (module settings: DataLoader
    workers started after this inherit them)."""
    cfg = datasets.config
    cfg.STREAMING_READ_MAX_RETRIES = cfg.STREAMING_OPEN_MAX_RETRIES = max(1, retries)
    cfg.STREAMING_READ_RETRY_INTERVAL = cfg.STREAMING_OPEN_RETRY_INTERVAL = backoff
    # datasets waits longer on "server unavailable" and "rate limited" (20 s and 60 s by default).
    cfg.STREAMING_READ_SERVER_UNAVAILABLE_RETRY_INTERVAL = cfg.STREAMING_READ_RATE_LIMIT_RETRY_INTERVAL = 4 * backoff


def describe_source(source: SourceConfig) -> str:
    """A short human name: ``pydocs``, ``wikitext/wikitext-103-raw-v1``, ``json:corpus.jsonl``."""
    if source.path == "builtin":
        return str(source.name)
    if source.path in FILE_BUILDERS:
        files = source.data_files if isinstance(source.data_files, str) else ",".join(source.data_files or [])
        return f"{source.path}:{files}"
    return f"{source.path}/{source.name}" if source.name else source.path


def is_transient(err: BaseException) -> bool:
    """Worth another try: 429, 5xx, dropped connections and timeouts (also as the cause of another error)."""
    while err is not None:
        response = getattr(err, "response", None)
        status = getattr(response, "status_code", None)
        if status is not None and (status == 429 or status >= 500):
            return True
        if isinstance(err, (ConnectionError, TimeoutError)) or any(
            word in type(err).__name__ for word in ("Timeout", "Connect", "RemoteProtocol")
        ):
            return True
        err = err.__cause__ or err.__context__
    return False


def _open(source: SourceConfig, cache_dir: str | None) -> datasets.IterableDataset:
    """Open with ``data.retries`` tries on transient errors: the repo-info call of ``load_dataset`` is
    retried by neither ``huggingface_hub`` nor ``datasets``."""
    tries = max(1, datasets.config.STREAMING_OPEN_MAX_RETRIES)
    for attempt in range(1, tries + 1):
        try:
            return _open_once(source, cache_dir)
        except Exception as err:
            if attempt == tries or not is_transient(err):
                raise
            logger.warning("opening %s failed (%s: %s); try %d of %d in %.0f s", describe_source(source),
                           type(err).__name__, str(err).splitlines()[0] if str(err) else "", attempt + 1, tries,
                           datasets.config.STREAMING_OPEN_RETRY_INTERVAL)
            time.sleep(datasets.config.STREAMING_OPEN_RETRY_INTERVAL)
    raise AssertionError("unreachable")


def _open_once(source: SourceConfig, cache_dir: str | None) -> datasets.IterableDataset:
    if source.path == "builtin":
        return datasets.load_dataset(
            "json", data_files=str(BUILTIN_CORPORA[source.name]), split="train", streaming=True, cache_dir=cache_dir
        )
    kwargs = {"split": source.split, "cache_dir": cache_dir}
    if source.name:
        kwargs["name"] = source.name
    if source.data_files:
        kwargs["data_files"] = source.data_files
    if source.pinned_revision or source.revision:  # the pin wins: a resume reads the commit the run started on
        kwargs["revision"] = source.pinned_revision or source.revision
    ds = datasets.load_dataset(source.path, **kwargs, streaming=source.streaming)
    if not source.streaming:
        ds = ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds))))
    return ds


def _text_only(ds: datasets.IterableDataset, source: SourceConfig, skips_key: str) -> datasets.IterableDataset:
    columns = ds.column_names
    if columns is None:  # features unknown until the first example is read
        columns = list(next(iter(ds.take(1))).keys())
    if source.text_column not in columns:
        raise ConfigError(
            f"data source '{describe_source(source)}' has no column '{source.text_column}'; its columns are: "
            f"{', '.join(columns)} (set text_column)"
        )
    features = ds.features
    if features is not None and source.text_column in features:
        dtype = getattr(features[source.text_column], "dtype", None)
        if dtype is not None and dtype not in ("string", "large_string"):
            raise ConfigError(
                f"data source '{describe_source(source)}': column '{source.text_column}' holds {dtype}, not text "
                "(set text_column to the column with the documents)"
            )
    ds = ds.select_columns([source.text_column])
    if source.text_column != "text":
        ds = ds.rename_column(source.text_column, "text")
    # Always: null, non-text and empty documents are skipped and counted, never passed on.
    ds = ds.filter(TextFilter(skips_key, source.min_words), batched=True, batch_size=ROW_BATCH)
    if source.max_samples is not None:  # per source shard: the same documents on every layout
        ds = cap_per_shard(ds, source.max_samples, what=f"the max_samples of data source '{describe_source(source)}'")
    return ds


def _processed(source: SourceConfig, cache_dir: str | None, skips_key: str) -> datasets.IterableDataset:
    """The source's ``text`` rows after its filters and cap; read from / written to the processed-data
    cache when ``cache: true`` or ``streaming: false`` (seed 000: download and process once)."""
    if not (source.cache or not source.streaming):
        return _text_only(_open(source, cache_dir), source, skips_key)
    from hf_streamlm.data.cache import cached_source

    streamed = dataclasses.replace(source, streaming=True)  # read once as a stream, keep the processed rows
    return cached_source(source, lambda: _text_only(_open(streamed, cache_dir), streamed, skips_key), cache_dir,
                         extra={})


class SourceTag:
    """Batched map adding the ``source`` column (a class, not a lambda: the stream must pickle for
    spawned DataLoader workers)."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return {"source": [self.index] * len(batch["text"])}


def load_source(
    source: SourceConfig, cache_dir: str | None = None, index: int = 0, skips_key: str = "default"
) -> datasets.IterableDataset:
    """Open ``source`` (or the first of its fallbacks that opens) as ``{"text", "source"}`` rows."""
    chain = [source] + [build(SourceConfig, f) for f in source.fallbacks]
    failures = []
    for candidate in chain:
        try:
            ds = _processed(candidate, cache_dir, skips_key)
        except Exception as err:  # noqa: BLE001 - any reason to skip a source is reported, not raised
            if len(chain) == 1 and isinstance(err, ConfigError):
                raise
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            failures.append(f"{describe_source(candidate)}: {type(err).__name__}: {reason}")
            continue
        message = f"data source {index}: using {describe_source(candidate)}"
        if failures:
            message += "; tried before it: " + "; ".join(failures)
        if len(chain) > 1 and message not in _reported:
            _reported.add(message)
            (logger.warning if failures else logger.info)(message)
        return ds.map(SourceTag(index), batched=True, batch_size=ROW_BATCH)
    if len(chain) == 1:
        raise ConfigError(f"data source {failures[0]}")
    raise ConfigError(f"no source of data.sources[{index}] could be opened: " + "; ".join(failures))


def training_sources(config: Config) -> list[SourceConfig]:
    """``data.sources``, plus seed 004's ``data.train_shards`` as one more source (index order)."""
    data = config.data
    return list(data.sources) + ([_shard_source(data.train_shards)] if data.train_shards else [])


def _shard_source(files: list[str]) -> SourceConfig:
    builder = "json" if all(f.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")) for f in files) else "text"
    return SourceConfig(path=builder, data_files=list(files))


def source_names(config: Config) -> list[str]:
    """Report names of ``data.sources`` (plus ``train_shards``), by source index."""
    sources = training_sources(config)
    names = [s.label or describe_source(s) for s in sources]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
