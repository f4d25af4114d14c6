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
