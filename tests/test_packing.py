"""Packing: no token lost at batch edges, fixed block sizes, drop/pad of the last block, and
per-document positions for packed decoders."""

from __future__ import annotations

import random

import pytest

from hf_streamlm.data.collate import CausalCollator, MLMCollator
from hf_streamlm.data.packing import pack


def random_documents(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 1000) for _ in range(rng.choice([0, 1, 3, 17, 64, 300]))] + [2] for _ in range(n)]


@pytest.mark.parametrize("block_size", [1, 7, 64, 128])
@pytest.mark.parametrize("seed", [0, 1])
def test_blocks_concatenate_to_the_documents(block_size, seed):
    docs = random_documents(200, seed)
    flat = [t for d in docs for t in d]
    blocks = list(pack(iter(docs), block_size, drop_last=True))
    assert all(len(b["input_ids"]) == block_size for b in blocks)
    joined = [t for b in blocks for t in b["input_ids"]]
    assert joined == flat[: len(joined)]
    assert len(flat) - len(joined) < block_size  # only the final partial block is dropped
    padded = list(pack(iter(docs), block_size, drop_last=False, pad_id=0))
    last = padded[-1]
    kept = sum(last["attention_mask"])
    assert [t for b in padded[:-1] for t in b["input_ids"]] + last["input_ids"][:kept] == flat
    assert last["input_ids"][kept:] == [0] * (block_size - kept)


def test_document_positions_restart_and_segments_number_within_block():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]]
    blocks = list(pack(iter(docs), 4, drop_last=False, pad_id=0, with_documents=True))
    assert [b["input_ids"] for b in blocks] == [[10, 11, 12, 20], [21, 30, 31, 32], [33, 34, 0, 0]]
    assert [b["position_ids"] for b in blocks] == [[0, 1, 2, 0], [0, 0, 1, 2], [0, 1, 2, 3]]
    assert [b["document_ids"] for b in blocks] == [[0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0]]
    batch = CausalCollator()(blocks)
    assert batch["position_ids"].shape == batch["document_ids"].shape == (3, 4)
    assert batch["labels"][2].tolist() == [33, 34, -100, -100]


def test_mlm_masking_rates_specials_and_seed():
    import torch

    special = [0, 1, 2, 3, 4]
    blocks = [{"input_ids": [2] + [random.Random(i).randrange(5, 500) for _ in range(510)] + [3],
               "attention_mask": [1] * 512} for i in range(32)]
    collate = MLMCollator(mask_token_id=4, vocab_size=500, special_ids=special, mlm_probability=0.15, seed=7)
    batch = collate(blocks)
    original = torch.tensor([b["input_ids"] for b in blocks])
    chosen = batch["labels"] != -100
    assert 0.13 < chosen.float().mean() < 0.17
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # [CLS]/[SEP] never masked
    assert torch.equal(batch["labels"][chosen], original[chosen])
    masked = (batch["input_ids"] == 4) & chosen
    kept = (batch["input_ids"] == original) & chosen
    assert 0.75 < masked.sum() / chosen.sum() < 0.85
    assert 0.06 < kept.sum() / chosen.sum() < 0.14  # 10% kept (+ random draws that hit the same id)
    again = MLMCollator(mask_token_id=4, vocab_size=500, special_ids=special, mlm_probability=0.15, seed=7)(blocks)
    assert torch.equal(again["input_ids"], batch["input_ids"])  # seeded
