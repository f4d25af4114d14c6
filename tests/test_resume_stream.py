"""Exact resume of the training stream: the resumed stream equals the uninterrupted one (same
batches, same order: 0 duplicated, 0 missing), for 0 and 2 DataLoader workers, two ranks, resume
points inside a tokenization batch / with a full shuffle buffer / mid-block, and resuming twice."""

from __future__ import annotations

import functools
import itertools
import json
import re

import pytest
import torch

from hf_streamlm.config import load_config
from hf_streamlm.data.pipeline import build_train_loader
from hf_streamlm.tokenizer import train_tokenizer
from hf_streamlm.train.loop import make_collator

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three JSONL shards of documents that carry their id (doc-00042) and vary in length."""
    root = tmp_path_factory.mktemp("corpus")
    doc = 0
    for shard in range(3):
        with (root / f"part-{shard}.jsonl").open("w") as f:
            for _ in range(120):
                n = 3 + (doc * 7) % 40
                words = " ".join(WORDS[(doc + i) % len(WORDS)] for i in range(n))
                f.write(json.dumps({"text": f"doc{doc:05d} {words}"}) + "\n")
                doc += 1
    return root


def config_for(corpus, family: str, workers: int, **extra):
    recipe = "quickstart" if family == "microbert" else "quickstart_decoder"
    args = [f"recipe={recipe}", f"data.sources=[{{path: json, data_files: '{corpus}/part-*.jsonl'}}]",
            f"data.num_workers={workers}", "data.batch_size=4", "data.sequence_length=32",
            "data.shuffle_buffer_size=50", "data.eval_holdout=0"]
    return load_config(args + [f"{k}={v}" for k, v in extra.items()])


@pytest.fixture(scope="module")
def tokenizers(corpus):
    texts = [json.loads(line)["text"] for p in sorted(corpus.glob("*.jsonl")) for line in p.read_text().splitlines()]
    return {
        "microbert": train_tokenizer(texts, "wordpiece", vocab_size=300, min_frequency=1),
        "decoder": train_tokenizer(texts, "bpe", vocab_size=400, min_frequency=1),
    }


def loader(config, tokenizer, rank=0, world=1):
    return build_train_loader(config, tokenizer, functools.partial(make_collator, config, tokenizer), rank, world)


def take(stream_loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(stream_loader), n))


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def doc_ids(batches: list[dict], tokenizer) -> list[str]:
    text = " ".join(tokenizer.decode(b["input_ids"].flatten()) for b in batches)
    return re.findall(r"doc\s*\d{5}", text)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("family", ["microbert", "decoder"])
def test_resume_equals_uninterrupted(corpus, tokenizers, family, workers):
    config = config_for(corpus, family, workers, **({"data.document_masking": "true"} if family == "decoder" else {}))
    tok = tokenizers[family]
    reference = take(loader(config, tok), 60)  # several passes over the 360 documents
    assert len(reference) == 60
    for point in (1, 3, 7, 22, 41):  # inside a tokenize batch, full buffer, mid-block, across epochs
        first = loader(config, tok)
        it = iter(first)
        head = [next(it) for _ in range(point)]
        state = first.state_dict()
        resumed = loader(config, tok)
        resumed.load_state_dict(state)
        tail = take(resumed, 60 - point)
        assert same(head + tail, reference), f"resume at batch {point} diverged"


def test_resume_twice_and_no_duplicates(corpus, tokenizers):
    config = config_for(corpus, "decoder", 2)
    tok = tokenizers["decoder"]
    reference = take(loader(config, tok), 30)
    a = loader(config, tok)
    it = iter(a)
    part1 = [next(it) for _ in range(5)]
    b = loader(config, tok)
    b.load_state_dict(a.state_dict())
    it = iter(b)
    part2 = [next(it) for _ in range(9)]
    c = loader(config, tok)
    c.load_state_dict(b.state_dict())
    part3 = take(c, 16)
    assert same(part1 + part2 + part3, reference)
    ids = doc_ids(reference[:20], tok)
    # within one pass (360 documents > 20 batches' worth) no document repeats, none is skipped in order
    assert len(ids) == len(set(ids)) > 20


def test_two_ranks_are_disjoint_and_each_resumes(corpus, tokenizers):
    config = config_for(corpus, "decoder", 0, **{"data.shuffle_buffer_size": 0})
    tok = tokenizers["decoder"]
    per_rank = {}
    for rank in (0, 1):
        reference = take(loader(config, tok, rank, 2), 12)
        first = loader(config, tok, rank, 2)
        it = iter(first)
        head = [next(it) for _ in range(5)]
        resumed = loader(config, tok, rank, 2)
        resumed.load_state_dict(first.state_dict())
        assert same(head + take(resumed, 7), reference)
        per_rank[rank] = set(doc_ids(reference[:6], tok))
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
