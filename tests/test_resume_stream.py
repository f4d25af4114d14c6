"""Exact resume of the training stream: the resumed stream equals the uninterrupted one (same
batches, same order: 0 duplicated, 0 missing), for 0 and 2 DataLoader workers, two ranks, resume
points inside a tokenization batch / with a full shuffle buffer / mid-block, and resuming twice; with the block
shuffle after packing (``data.block_shuffle_size``) as the recipes run it."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import pickle
import re

import pytest
import torch

from hf_streamlm.config import ConfigError, load_config
from hf_streamlm.data.pipeline import build_train_loader
from hf_streamlm.tokenizer import train_tokenizer
from hf_streamlm.data.collate import make_collator

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
            "data.shuffle_buffer_size=50", "data.block_shuffle_size=6", "data.eval_holdout=0"]
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
    # Tensors, and the flash kernels' longest segment (`max_length_q/k`, a Python int).
    def equal(u, v) -> bool:
        return torch.equal(u, v) if torch.is_tensor(u) else u == v

    return len(a) == len(b) and all(x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


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
    config = config_for(corpus, "decoder", 0, **{"data.shuffle_buffer_size": 0, "data.block_shuffle_size": 0})
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


def test_state_holds_references_and_resumes_from_mid_pass_anchors(corpus, tokenizers, monkeypatch):
    """The data state holds no document text, only positions and references; resuming re-reads the
    source from a mid-pass anchor (a small ANCHOR_EVERY makes the anchors fall inside passes and
    inside shards) and still gives the uninterrupted batches."""
    from hf_streamlm.data import stream

    monkeypatch.setattr(stream, "ANCHOR_EVERY", 11)
    config = config_for(corpus, "decoder", 0, **{"data.shuffle_buffer_size": 40, "data.document_masking": "true"})
    tok = tokenizers["decoder"]
    reference = take(loader(config, tok), 60)
    mid_pass = 0
    for point in (9, 23, 38, 47):
        first = loader(config, tok)
        it = iter(first)
        head = [next(it) for _ in range(point)]
        state = first.state_dict()
        snapshots = [w["snapshot"] for w in state["workers"].values()]
        mid_pass += sum(s["anchor"][2] is not None for s in snapshots)  # a datasets position inside a pass
        assert all(len(s["buffer"]) <= 40 for s in snapshots)  # as references
        blob = pickle.dumps(state)
        assert b"doc00" not in blob and b"alpha beta" not in blob  # no text in the state
        resumed = loader(config, tok)
        resumed.load_state_dict(state)
        it = iter(resumed)
        middle = [next(it) for _ in range(2)]
        again = loader(config, tok)  # a second resume, right after one from a mid-pass anchor
        again.load_state_dict(resumed.state_dict())
        tail = take(again, 60 - point - 2)
        assert same(head + middle + tail, reference), f"resume at batch {point} diverged"
    assert mid_pass


def test_a_changed_source_stops_the_resume_with_one_line(corpus, tokenizers, tmp_path):
    """Positions that point at other documents (the source changed under the checkpoint) are caught by
    the documents' content keys: one line, no silent training on other text."""
    for p in corpus.glob("*.jsonl"):
        (tmp_path / p.name).write_text(p.read_text())
    config = config_for(tmp_path, "decoder", 0)
    tok = tokenizers["decoder"]
    first = loader(config, tok)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    lines = (tmp_path / "part-0.jsonl").read_text().splitlines()
    (tmp_path / "part-0.jsonl").write_text("\n".join([json.dumps({"text": "a new dump of the web"})] + lines) + "\n")
    resumed = loader(config, tok)
    resumed.load_state_dict(state)
    with pytest.raises(ConfigError, match="source changed since the checkpoint.*revision"):
        take(resumed, 1)


def test_trace_lists_every_document_of_a_pass_once_across_resumes(corpus, tokenizers):
    """data.trace_documents: the documents that end in each batch, with their pass; stopped and resumed
    twice, passes 0 and 1 each list each of the 360 documents exactly once."""
    config = config_for(corpus, "decoder", 2, **{"data.trace_documents": "true", "data.batch_size": 8,
                                                 "data.sequence_length": 64, "data.shuffle_buffer_size": 100})
    tok = tokenizers["decoder"]
    traced, state = [], None
    for n in (13, 34, 40):  # ~40 batches per pass: stops inside pass 0 and inside pass 1
        part = loader(config, tok)
        if state is not None:
            part.load_state_dict(state)
        it = iter(part)
        for _ in range(n):
            next(it)
            traced.append(part.take_documents())
        state = part.state_dict()
    texts = [json.loads(line)["text"] for p in sorted(corpus.glob("*.jsonl")) for line in p.read_text().splitlines()]
    keys = sorted(hashlib.blake2b(t.encode("utf-8"), digest_size=8).hexdigest() for t in texts)
    docs = [d for batch in traced for d in batch]
    assert all(source == 0 and len(key) == 16 for source, key, _ in docs)
    for epoch in (0, 1):  # each document of a pass listed once, across the stops
        assert sorted(key for _, key, e in docs if e == epoch) == keys, f"pass {epoch}"
