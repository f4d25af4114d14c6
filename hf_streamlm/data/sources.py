"""Sources: one ``datasets.IterableDataset`` per configured source, reduced to a ``text`` column."""

from __future__ import annotations

import logging

import datasets

from hf_streamlm.config import ConfigError, SourceConfig
from hf_streamlm.data.corpus import BUILTIN_CORPORA

logger = logging.getLogger(__name__)

FILE_BUILDERS = ("json", "parquet", "text", "csv", "arrow")


def load_source(source: SourceConfig, cache_dir: str | None = None) -> datasets.IterableDataset:
    """Open ``source`` as a stream with a single ``text`` column, filtered and capped."""
    if source.path == "builtin":
        ds = datasets.load_dataset(
            "json", data_files=str(BUILTIN_CORPORA[source.name]), split="train", streaming=True, cache_dir=cache_dir
        )
    else:
        kwargs = {"split": source.split, "cache_dir": cache_dir}
        if source.name:
            kwargs["name"] = source.name
        if source.data_files:
            kwargs["data_files"] = source.data_files
        if source.revision:
            kwargs["revision"] = source.revision
        try:
            ds = datasets.load_dataset(source.path, **kwargs, streaming=source.streaming)
        except FileNotFoundError as err:
            raise ConfigError(f"data source '{source.path}' ({source.data_files or source.name}): {err}") from None
        if not source.streaming:
            ds = ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds))))
    columns = ds.column_names
    if columns is None:  # features unknown until the first example is read
        columns = list(next(iter(ds.take(1))).keys())
    if source.text_column not in columns:
        raise ConfigError(
            f"data source '{source.path}' has no column '{source.text_column}'; its columns are: "
            f"{', '.join(columns)} (set text_column)"
        )
    ds = ds.select_columns([source.text_column])
    if source.text_column != "text":
        ds = ds.rename_column(source.text_column, "text")
    if source.min_words:
        min_words = source.min_words
        ds = ds.filter(lambda batch: [len(t.split()) >= min_words for t in batch["text"]], batched=True)
    if source.max_samples is not None:
        ds = ds.take(source.max_samples)
    return ds
