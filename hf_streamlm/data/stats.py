"""Pipeline statistics (seed 002's ``sample_stats``): what a recipe's stream holds and how fast it flows.

:func:`pipeline_stats` runs the recipe's whole data path, sources to collated tensor batches, over
its first ``max_docs`` training documents and counts documents, tokens, blocks and batches, with
timings of that pipeline part alone. Per-document token counts come from a separate, untimed pass
(:func:`~hf_streamlm.data.pipeline.iter_texts` + the tokenizer), since packed blocks no longer
know where their documents ended.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from hf_streamlm.config import Config, ConfigError
from hf_streamlm.data import build_train_blocks
from hf_streamlm.data.pipeline import iter_rows, source_names
from hf_streamlm.data.quality import skip_counter

DEFAULT_MAX_DOCS = 1000
"""Documents measured when the recipe leaves ``data.max_samples`` null (a stream may be endless)."""

ENCODE_BATCH = 1000
"""Documents per tokenizer call in the counting pass (lets the Rust tokenizer run in parallel)."""


def separator_count(config: Config) -> int:
    """Special tokens the pipeline wraps around each document: [CLS] x [SEP] (MicroBERT), x <eos> (decoder)."""
    return 2 if config.model.type == "microbert" else 1


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(texts)
    while batch := list(itertools.islice(it, size)):
        yield batch


def count_tokens(
    config: Config, tokenizer, max_docs: int, skips_key: str = "stats"
) -> tuple[list[int], list[int], Counter]:
    """Per-document (tokens with separators, UTF-8 bytes) of the first ``max_docs`` documents, and the
    documents per source name."""
    extra = separator_count(config)
    tokens: list[int] = []
    sizes: list[int] = []
    per_source: Counter = Counter()
    names = source_names(config)
    rows = iter_rows(config, limit=max_docs, skips_key=skips_key)

    def texts_counting_sources() -> Iterator[str]:
        for text, source in rows:
            per_source[names[source]] += 1
            yield text

    for batch in _batches(texts_counting_sources(), ENCODE_BATCH):
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        tokens.extend(len(ids) + extra for ids in encoded)
        sizes.extend(len(text.encode("utf-8")) for text in batch)
    return tokens, sizes, per_source


class _Head(torch.utils.data.IterableDataset):
    """The first ``n`` items of an iterable: we stop the stream ourselves, it may never end."""

    def __init__(self, items: Iterable, n: int):
        self.items, self.n = items, n

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.items), self.n)


def pipeline_stats(config: Config, tokenizer, max_docs: int) -> dict[str, Any]:
    """Run ``config``'s stream over its first ``max_docs`` training documents and measure it.

    ``tokens`` counts document tokens with their separators (what packing consumes); ``block_tokens``
    the non-padding tokens in the emitted blocks (fewer by the last partial block with
    ``data.drop_last``). Speeds cover sources -> collated batches, not the counting pass. The result
    also holds ``doc_tokens``, the per-document counts (for a histogram).
    """
    if max_docs <= 0:
        raise ConfigError(f"the number of documents to measure must be > 0, got {max_docs}")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, max_samples=max_docs))
    skips_key = f"stats-{uuid.uuid4().hex}"
    doc_tokens, doc_bytes, per_source = count_tokens(config, tokenizer, max_docs, skips_key)
    if not doc_tokens:
        raise ConfigError("the training stream yielded no documents: check data.sources, min_words and eval_holdout")
    tokens, length, batch_size = sum(doc_tokens), config.data.sequence_length, config.data.batch_size
    expected_blocks = tokens // length if config.data.drop_last else math.ceil(tokens / length)

    from hf_streamlm.train.loop import make_collator

    start = time.perf_counter()
    blocks = build_train_blocks(config, tokenizer)
    # Single process: worker processes would each read the whole stream through this wrapper.
    loader = DataLoader(_Head(blocks, expected_blocks), batch_size=batch_size,
                        collate_fn=make_collator(config, tokenizer, config.runtime.seed))
    n_blocks = n_batches = block_tokens = 0
    for batch in loader:
        n_batches += 1
        n_blocks += batch["input_ids"].shape[0]
        block_tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - start

    total_bytes = sum(doc_bytes)
    return {
        "docs": len(doc_tokens),
        "tokens": tokens,
        "blocks": n_blocks,
        "batches": n_batches,
        "block_tokens": block_tokens,
        "avg_tokens": tokens / len(doc_tokens),
        "median_tokens": statistics.median(doc_tokens),
        "min_tokens": min(doc_tokens),
        "max_tokens": max(doc_tokens),
        "bytes": total_bytes,
        "bytes_per_token": total_bytes / tokens,
        "seconds": seconds,
        "docs_per_s": len(doc_tokens) / seconds,
        "tokens_per_s": tokens / seconds,
        "sequence_length": length,
        "batch_size": batch_size,
        "max_docs": max_docs,
        "sources": dict(per_source),
        "skipped": dict(skip_counter(skips_key)),  # documents not trained on, by kind
        "doc_tokens": doc_tokens,
    }


def plot_token_histogram(doc_tokens: list[int], path: str | Path, title: str = "") -> None:
    """Histogram of tokens per document, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless: stats runs on machines without a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(doc_tokens, bins=min(50, max(1, len(set(doc_tokens)))), color="tab:blue")
    ax.axvline(statistics.median(doc_tokens), color="tab:red", linestyle="--",
               label=f"median {statistics.median(doc_tokens):g}")
    ax.set_xlabel("tokens per document (with separators)")
    ax.set_ylabel("documents")
    ax.set_title(title or f"{len(doc_tokens)} documents")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
