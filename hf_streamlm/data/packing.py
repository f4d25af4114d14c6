"""Packing: concatenate tokenized documents and cut fixed-length blocks with a rolling buffer.

Documents arrive already wrapped in their separators (``[CLS] ... [SEP]`` for MicroBERT,
``... <eos>`` for the decoder), so the concatenation of all emitted blocks equals the concatenation
of all documents: nothing is lost at the edges of ``map`` batches (seed 002's rolling buffer).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def pack(
    documents: Iterable[list[int]], block_size: int, drop_last: bool = True, pad_id: int = 0
) -> Iterator[dict[str, list[int]]]:
    """Yield ``{"input_ids", "attention_mask"}`` blocks of exactly ``block_size`` tokens."""
    buffer: list[int] = []
    start = 0
    for ids in documents:
        buffer.extend(ids)
        while len(buffer) - start >= block_size:
            yield {"input_ids": buffer[start : start + block_size], "attention_mask": [1] * block_size}
            start += block_size
        if start > 4 * block_size:  # compact now and then instead of on every block
            del buffer[:start]
            start = 0
    rest = buffer[start:]
    if rest and not drop_last:
        pad = block_size - len(rest)
        yield {"input_ids": rest + [pad_id] * pad, "attention_mask": [1] * len(rest) + [0] * pad}
