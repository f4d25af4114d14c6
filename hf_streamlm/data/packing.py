"""Packing: concatenate tokenized documents and cut fixed-length blocks with a rolling buffer.

Documents arrive already wrapped in their separators (``[CLS] ... [SEP]`` for MicroBERT,
``... <eos>`` for the decoder), so the concatenation of all emitted blocks equals the concatenation
of all documents: nothing is lost at the edges of ``map`` batches (seed 002's rolling buffer).

With ``with_documents`` each block also carries ``position_ids`` that restart at every document
start inside the block and ``document_ids`` numbering the document segments of the block, so a
decoder can keep packed documents apart (attention does not cross them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def document_positions(serials: list[int]) -> tuple[list[int], list[int]]:
    """Per-token (position within its document segment, segment index) for a block's document serials."""
    seg = np.asarray(serials)
    starts = np.r_[True, seg[1:] != seg[:-1]]
    doc = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    return (np.arange(len(seg)) - first[doc]).tolist(), doc.tolist()


def pack(
    documents: Iterable[list[int]],
    block_size: int,
    drop_last: bool = True,
    pad_id: int = 0,
    with_documents: bool = False,
) -> Iterator[dict[str, list[int]]]:
    """Yield ``{"input_ids", "attention_mask"[, "position_ids", "document_ids"]}`` blocks of ``block_size``."""
    buffer: list[int] = []
    serials: list[int] = []  # which document each buffered token came from (only with_documents)
    start = 0

    def block(end: int, pad: int = 0) -> dict[str, list[int]]:
        out = {"input_ids": buffer[start:end] + [pad_id] * pad, "attention_mask": [1] * (end - start) + [0] * pad}
        if with_documents:
            positions, docs = document_positions(serials[start:end])
            # Padding continues the last segment's positions; it is masked out of attention and loss anyway.
            out["position_ids"] = positions + list(range(positions[-1] + 1, positions[-1] + 1 + pad))
            out["document_ids"] = docs + [docs[-1]] * pad
        return out

    for serial, ids in enumerate(documents):
        buffer.extend(ids)
        if with_documents:
            serials.extend([serial] * len(ids))
        while len(buffer) - start >= block_size:
            yield block(start + block_size)
            start += block_size
        if start > 4 * block_size:  # compact now and then instead of on every block
            del buffer[:start]
            del serials[:start]
            start = 0
    rest = len(buffer) - start
    if rest and not drop_last:
        yield block(len(buffer), block_size - rest)
