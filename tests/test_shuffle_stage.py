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
