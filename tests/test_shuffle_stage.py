"""The stream's own stages on tiny data: the seeded shuffle buffer loses and repeats nothing within a
pass, really shuffles, and is reproducible; packing inside the stream keeps every token."""

from __future__ import annotations

import datasets
import torch

from hf_streamlm.data.stream import WorkerPipeline


def ids_collate(blocks):
    return {"input_ids": torch.tensor([b["input_ids"] for b in blocks])}


def pipeline(n_docs: int, buffer: int, seed: int = 0, block: int = 1) -> WorkerPipeline:
    texts = datasets.Dataset.from_dict({"text": [str(i) for i in range(n_docs)]}).to_iterable_dataset()
    return WorkerPipeline(texts, lambda batch: [[int(t)] for t in batch], ids_collate, batch_size=1,
                          block_size=block, shuffle_buffer_size=buffer, seed=seed, tokenize_batch=7)


def drain(p: WorkerPipeline, n: int) -> list[int]:
    return [int(p.next_batch()["input_ids"].flatten()[0]) for _ in range(n)]


def test_shuffle_buffer_is_a_seeded_permutation_per_pass():
    first_pass = drain(pipeline(200, buffer=50), 150)
    assert len(set(first_pass)) == 150  # nothing repeated while the first pass lasts
    assert first_pass != sorted(first_pass)
    assert drain(pipeline(200, buffer=50), 150) == first_pass  # seeded
    assert drain(pipeline(200, buffer=50, seed=1), 150) != first_pass
    assert drain(pipeline(200, buffer=0), 200) == list(range(200))  # no buffer: stream order


def test_stream_cycles_passes_and_keeps_every_token():
    p = pipeline(30, buffer=0, block=4)
    tokens = [t for _ in range(15) for t in p.next_batch()["input_ids"].flatten().tolist()]
    assert tokens == (list(range(30)) * 2)[:60]  # two passes, blocks cut across documents and passes
    assert p.epoch >= 1  # the reader is on a later pass (it reads ahead of the blocks handed out)


def traced_pipeline(n_docs: int, buffer: int) -> WorkerPipeline:
    texts = datasets.Dataset.from_dict({"text": [str(i) for i in range(n_docs)]}).to_iterable_dataset()
    return WorkerPipeline(texts, lambda batch: [[int(t)] for t in batch], ids_collate, batch_size=1, block_size=1,
                          shuffle_buffer_size=buffer, seed=0, tokenize_batch=7, trace=True)


def test_buffer_never_mixes_passes_and_clamps_to_a_smaller_share(caplog):
    """A buffer larger than the pass it shuffles (100 > 60 documents) is clamped with one warning, and
    no pass mixes with the next: the first 60 documents out are pass 0, a permutation of all 60, and
    the batches carry the pass of the document they train on (``epoch`` in history)."""
    p = traced_pipeline(60, buffer=100)
    with caplog.at_level("WARNING"):
        out = []
        for _ in range(120):
            batch = p.next_batch()
            (_, _, epoch), = batch["_docs"]
            out.append((int(batch["input_ids"]), epoch, batch["_epoch"]))
    assert [m for m in caplog.messages if "clamped" in m] and len(caplog.messages) == 1
    first, second = out[:60], out[60:]
    assert sorted(d for d, _, _ in first) == list(range(60)) == sorted(d for d, _, _ in second)
    assert {e for _, e, _ in first} == {0} and {e for _, e, _ in second} == {1}
    assert all(e == batch_epoch for _, e, batch_epoch in out)
    assert [d for d, _, _ in first] != [d for d, _, _ in second]  # each pass reshuffled


def block_pipeline(blocks: int, seed: int = 0) -> WorkerPipeline:
    """Documents of 3 to 9 one-token blocks each (document d's tokens are all d), cut in blocks of 1."""
    lengths = [3 + (d * 5) % 7 for d in range(60)]
    texts = datasets.Dataset.from_dict({"text": [str(d) for d in range(60)]}).to_iterable_dataset()
    return WorkerPipeline(texts, lambda batch: [[int(t)] * lengths[int(t)] for t in batch], ids_collate,
                          batch_size=8, block_size=1, shuffle_buffer_size=0, seed=seed, tokenize_batch=7,
                          trace=True, block_shuffle_size=blocks)


def test_block_shuffle_spreads_a_batch_over_documents_and_never_mixes_passes():
    """Packing puts a document's blocks next to each other: without the block shuffle a batch of 8 blocks
    holds about 2 documents. With a buffer of 64 blocks it holds about 7 (run_clm's shuffled blocks: ~8),
    every block of a pass comes out once before any block of the next pass, and the order is seeded."""
    one_pass = [d for d in range(60) for _ in range(3 + (d * 5) % 7)]
    total = len(one_pass)  # blocks per pass

    def passes(p: WorkerPipeline, n: int) -> list[list[int]]:
        return [p.next_batch()["input_ids"].flatten().tolist() for _ in range(n)]

    n = -(-2 * total // 8)
    plain, shuffled = passes(block_pipeline(0), n), passes(block_pipeline(64), n)
    distinct = [sum(len(set(b)) for b in batches) / len(batches) for batches in (plain, shuffled)]
    assert distinct[0] < 3 and distinct[1] > 6, distinct
    flat = [t for b in shuffled for t in b]
    assert sorted(flat[:total]) == sorted(flat[total:2 * total]) == one_pass
    assert flat[:total] != flat[total:2 * total]  # each pass reshuffled
    assert passes(block_pipeline(64), n) == shuffled != passes(block_pipeline(64, seed=1), n)
