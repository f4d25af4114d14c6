"""The block shuffle after packing (``data.block_shuffle_size``): the buffer's blocks as arrays, their encoding in the
data state, and the shuffle itself (a stage of :class:`hf_streamlm.data.stream.WorkerPipeline`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


def encode_blocks(blocks, name: str) -> dict[str, np.ndarray]:
    """Blocks of pieces ``(tokens, source, key, epoch, ends)`` as two arrays: ``name`` (block, tokens, source, key,
    epoch, ends) per piece and ``<name>_tokens``, all the pieces' tokens."""
    return {
        name: np.array([(b, len(p[0]), *p[1:]) for b, block in enumerate(blocks) for p in block],
                       dtype=np.uint64).reshape(-1, 6),
        f"{name}_tokens": np.array([t for block in blocks for p in block for t in p[0]], dtype=np.int32),
    }


def decode_blocks(state: dict[str, Any], name: str) -> list[list[tuple]]:
    """The blocks :func:`encode_blocks` wrote under ``name`` (none when the state has no such key)."""
    blocks: list[list[tuple]] = []
    tokens, start = state.get(f"{name}_tokens", np.zeros(0, dtype=np.int32)).tolist(), 0
    for block, length, source, key, epoch, ends in state.get(name, np.zeros((0, 6))).tolist():
        if block == len(blocks):
            blocks.append([])
        blocks[-1].append((tokens[start:start + length], source, key, epoch, bool(ends)))
        start += length
    return blocks


class Packed(NamedTuple):
    """A block in the block-shuffle buffer, in arrays (a state is written at every step without DataLoader
    workers: concatenating arrays costs far less than converting lists)."""

    tokens: np.ndarray  # int32
    pieces: np.ndarray  # (pieces, 5) uint64: tokens, source, key, epoch, ends
    phase: int = -1  # what the buffer never mixes: the pass of the first token (-1), or a mixture's stage

    @classmethod
    def of(cls, pieces: list[tuple], phase: int = -1) -> Packed:
        ids: list[int] = []
        for piece in pieces:
            ids += piece[0]
        meta = np.array([(len(p[0]), *p[1:]) for p in pieces], dtype=np.uint64).reshape(-1, 5)
        return cls(np.array(ids, dtype=np.int32), meta, phase)

    def unpack(self) -> list[tuple]:
        """The block as pieces ``(tokens, source, key, epoch, ends)``."""
        tokens, start, out = self.tokens.tolist(), 0, []
        for length, source, key, epoch, ends in self.pieces.tolist():
            out.append((tokens[start:start + length], source, key, epoch, bool(ends)))
            start += length
        return out

    @property
    def epoch(self) -> int:
        """The pass of the block's first token."""
        return int(self.pieces[0, 3])

    @property
    def key(self) -> int:
        """What the block shuffle keeps apart: the pass of the first token, or the mixture's stage."""
        return self.epoch if self.phase < 0 else self.phase


def encode_packed(blocks: list[Packed]) -> dict[str, np.ndarray]:
    """The block-shuffle buffer in a state: ``blocks`` (block, tokens, source, key, epoch, ends) per piece and
    ``blocks_tokens``, as :func:`encode_blocks` writes them."""
    if not blocks:
        return {"blocks": np.zeros((0, 6), dtype=np.uint64), "blocks_tokens": np.zeros(0, dtype=np.int32)}
    counts = [len(b.pieces) for b in blocks]
    index = np.repeat(np.arange(len(blocks), dtype=np.uint64), counts)
    return {"blocks": np.column_stack([index, np.concatenate([b.pieces for b in blocks])]),
            "blocks_tokens": np.concatenate([b.tokens for b in blocks]),
            "blocks_phase": np.array([b.phase for b in blocks], dtype=np.int64)}


def decode_packed(state: dict[str, Any]) -> list[Packed]:
    """The blocks :func:`encode_packed` wrote (none in a state written before the block shuffle)."""
    meta = state.get("blocks", np.zeros((0, 6), dtype=np.uint64))
    tokens = state.get("blocks_tokens", np.zeros(0, dtype=np.int32))
    out, start = [], 0
    firsts = np.flatnonzero(np.r_[True, meta[1:, 0] != meta[:-1, 0]]) if len(meta) else []
    for first, end in zip(firsts, list(firsts[1:]) + [len(meta)]):
        pieces = meta[first:end, 1:].copy()
        length = int(pieces[:, 0].sum())
        phase = int(state["blocks_phase"][len(out)]) if "blocks_phase" in state else -1
        out.append(Packed(tokens[start:start + length].astype(np.int32), pieces, phase))
        start += length
    return out


def shuffled_block(self: Any) -> tuple[list[tuple], int] | None:
    """The block shuffle after packing: fill the buffer with blocks, then hand out a random one. Packing a
    stream puts a document's blocks next to each other, so a batch of consecutive blocks holds several blocks
    of the same documents (run_clm draws its blocks from the whole corpus: measured 1.5-2% lower held-out loss
    at the quickstart's shape, docs/performance.md). Like the document buffer it never mixes passes: a block
    whose first token is of another pass than the buffered blocks' waits until the buffer has drained (blocks
    are cut in the order of their first tokens' passes, handed-over blocks included)."""
    while True:
        while self.block_wait is None and len(self.blocks) < self.block_shuffle_size:
            phase = self._block_phase()
            cut = cut_block(self)
            if cut is None:
                break
            block = Packed.of(cut[0], phase)
            if self.blocks and block.key != self.blocks[0].key:
                self.block_wait = block
                break
            self.blocks.append(block)
        if self.blocks:
            break
        if self.block_wait is None:
            return None
        self.blocks.append(self.block_wait)
        self.block_wait = None
    i = self.block_rng.randrange(len(self.blocks))
    self.blocks[i], self.blocks[-1] = self.blocks[-1], self.blocks[i]
    return self.blocks.pop().unpack(), 0


def block_of(self: Any, pieces: list[tuple], pad: int) -> dict[str, list[int]]:
    """The training block of ``pieces`` (:func:`cut_block`) and ``pad`` padding tokens: ``input_ids``, and with
    document masking ``position_ids``/``document_ids``; the trace's documents and the batch's pass noted."""
    # Full blocks: the collator adds the all-ones mask.
    ids: list[int] = []
    for piece in pieces:
        ids += piece[0]
    block = {"input_ids": ids}
    if self.with_documents:
        # A segment per piece: each is one document's tokens.
        lengths = [len(p[0]) for p in pieces]
        firsts = np.cumsum([0] + lengths[:-1])
        segment = np.repeat(np.arange(len(pieces)), lengths)
        block["position_ids"] = (np.arange(len(ids)) - firsts[segment]).tolist()
        block["document_ids"] = segment.tolist()
    if pad:
        block["input_ids"] += [self.pad_id] * pad
        block["attention_mask"] = [1] * (self.block_size - pad) + [0] * pad
        if self.with_documents:  # padding continues the last segment; it is masked out anyway
            last = block["position_ids"][-1]
            block["position_ids"] += list(range(last + 1, last + 1 + pad))
            block["document_ids"] += [block["document_ids"][-1]] * pad
    # The documents whose last token is in this block end here; the block's epoch is the pass of the
    # document that holds its last token.
    if self.trace:
        self.batch_docs += [[source, f"{key:016x}", epoch] for _, source, key, epoch, ends in pieces if ends]
        self.batch_open += [[source, f"{key:016x}", epoch] for _, source, key, epoch, ends in pieces if not ends]
    self.batch_epoch = pieces[-1][3]
    return block


def cut_block(self: Any) -> tuple[list[tuple], int] | None:
    """The next block of the packing buffer, as pieces ``(tokens, source, key, epoch, ends)`` (a document's
    tokens in the block; ``ends``: its last token is there), and the padding that ends a finite stream."""
    # A block handed over at a layout change starts the block, so that its tokens keep their places (and
    # positions) in it; this reader's own tokens complete it.
    handed = self.handed[0] if self.handed else []
    lead = sum(len(p[0]) for p in handed)
    pad = 0
    while lead + len(self.tokens) < self.block_size:
        if not self._fill():
            if not (lead or self.tokens) or self.pad_id is None:
                return None
            pad = self.block_size - lead - len(self.tokens)  # the end of a finite stream, kept (drop_last false)
            break
    if handed:
        self.handed.popleft()
    size = self.block_size - lead - pad
    pieces = list(handed)
    tokens, cut, ends = self.tokens, self.cut, self.doc_ends
    start = cut
    while ends and ends[0][0] <= cut + size:
        end, source, key, epoch = ends.popleft()
        pieces.append((tokens[start - cut:end - cut], source, key, epoch, True))
        start = end
    if start < cut + size:  # the document that goes on in the next block
        _, source, key, epoch = ends[0]
        pieces.append((tokens[start - cut:size], source, key, epoch, False))
    del tokens[:size]
    self.cut += size
    return pieces, pad
