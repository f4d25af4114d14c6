"""A capped pass (``data.max_samples``, a source's ``max_samples``) is the same set of documents on every
layout (issue #25): ranks x DataLoader workers 1x0, 2x2 and 4x0 train the same documents, the tokenizer's
sample is part of them, and a stream resumed mid-pass goes on exactly.

``datasets``' own ``take`` splits its count over the readers a stream is sharded to, so each reader took the
first ``n / readers`` documents of its own shards: 8 shards of 12 documents and ``max_samples=40`` gave
1x0 shards 0-3 (12, 12, 12, 4 documents) and 4x0 the first 10 of shards 0-3, 34 documents in common.
The cap is now per source shard (:mod:`hf_streamlm.data.cap`): shard ``j`` of 8 gives its first 5.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
from collections import Counter

import pytest

from hf_streamlm.config import load_config
from hf_streamlm.data import stream as stream_module
from hf_streamlm.data.collate import make_collator
from hf_streamlm.data.documents import document_key
from hf_streamlm.data.elastic import ShareStream
from hf_streamlm.data.cap import capped_shards, shard_quotas
from hf_streamlm.data.pipeline import _rank_texts, build_train_loader, iter_rows, iter_texts
from hf_streamlm.tokenizer import build_tokenizer, train_tokenizer
from hf_streamlm.tokenizer.train import tokenizer_doc_limit

LAYOUTS = [(1, 0), (2, 2), (4, 0)]  # (ranks, DataLoader workers)
SHARDS, PER_SHARD, CAP = 8, 12, 40


def write_source(root, name: str, shards: int, per_shard, start: int = 0) -> dict[int, list[str]]:
    """``shards`` jsonl files ``<name>-<i>.jsonl``; ``per_shard``: documents per shard (an int, or one per
    shard). Every text is distinct; returns the texts by shard."""
    root.mkdir(parents=True, exist_ok=True)
    sizes = per_shard if isinstance(per_shard, (list, tuple)) else [per_shard] * shards
    out, n = {}, start
    for shard, size in enumerate(sizes):
        texts = []
        for _ in range(size):
            texts.append(f"{name}{shard}x{n:04d} " + " ".join(f"w{(n * 7 + i) % 30}" for i in range(3 + n % 6)))
            n += 1
        (root / f"{name}-{shard}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        out[shard] = texts
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("capped")
    write_source(root, "m", 8, 12, start=2000)  # a second source, for a mixture
    return root, write_source(root, "p", SHARDS, PER_SHARD)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([" ".join(f"w{i}" for i in range(30))] * 20, "bpe", vocab_size=300, min_frequency=1)


def config_for(sources: str, workers: int, *extra: str):
    return load_config([
        "recipe=quickstart_decoder", f"data.sources={sources}", f"data.num_workers={workers}",
        "data.batch_size=2", "data.sequence_length=32", "data.shuffle_buffer_size=8", "data.eval_holdout=0",
        "data.trace_documents=true", f"data.max_samples={CAP}", *extra])


def one_source(root, name="p", workers=0, *extra):
    return config_for(f"[{{path: json, data_files: '{root}/{name}-*.jsonl'}}]", workers, *extra)


def trained_pass(config_of, tokenizer, ranks: int, workers: int, batches: int = 60) -> Counter:
    """``(source, key)`` of the documents of pass 0 as the training loaders of every rank trace them
    (``data.trace_documents``), with how often each is listed."""
    config = config_of(workers)
    docs: Counter = Counter()
    for rank in range(ranks):
        loader = build_train_loader(config, tokenizer, functools.partial(make_collator, config, tokenizer),
                                    rank, ranks)
        for _ in itertools.islice(iter(loader), batches):  # many passes of every reader: pass 0 is complete
            pass
        docs.update((source, key) for source, key, epoch in loader.take_documents() if epoch == 0)
    return docs


def keys(texts, source: int = 0) -> set[tuple[int, str]]:
    return {(source, f"{document_key(t):016x}") for t in texts}


def reader_texts(config, ranks: int, workers: int) -> list[str]:
    """The texts of one pass of every reader of a layout, at the stream the training pipelines read
    (``_rank_texts``, split per worker as ``datasets`` does and as an elastic resume rebuilds old readers)."""
    out = []
    for rank in range(ranks):
        ds, _ = _rank_texts(config, rank, ranks, "capped-test")
        for worker in range(max(1, workers)):
            out += [row["text"] for row in (ShareStream(ds, workers, worker) if workers else ds)]
    return out


@pytest.mark.timeout(300)
def test_a_capped_pass_is_the_same_documents_on_every_layout(corpus, tokenizer):
    root, texts = corpus
    expected = keys(t for shard in texts.values() for t in shard[:CAP // SHARDS])  # each shard's first 5
    for ranks, workers in LAYOUTS:
        docs = trained_pass(lambda w: one_source(root, "p", w), tokenizer, ranks, workers)
        assert set(docs) == expected, (ranks, workers, len(set(docs) & expected))
        assert sum(docs.values()) == CAP and set(docs.values()) == {1}  # 40 documents, each trained once


def test_every_reader_of_every_layout_reads_the_capped_set(corpus):
    """At the stream level, also as an elastic resume rebuilds another layout's readers (ShareStream)."""
    root, texts = corpus
    expected = sorted(t for shard in texts.values() for t in shard[:CAP // SHARDS])
    for ranks, workers in [*LAYOUTS, (2, 4), (8, 0), (1, 8)]:
        assert sorted(reader_texts(one_source(root), ranks, workers)) == expected, (ranks, workers)


def test_the_tokenizer_sample_is_part_of_the_capped_pass(corpus, monkeypatch):
    root, texts = corpus
    capped = {t for shard in texts.values() for t in shard[:CAP // SHARDS]}
    seen = []

    def spy(texts_in, *args, **kwargs):
        seen.append(list(texts_in))
        return train_tokenizer(seen[-1], *args, **kwargs)

    monkeypatch.setattr("hf_streamlm.tokenizer.train.train_tokenizer", spy)
    samples = []
    for _, workers in LAYOUTS:
        for extra in ((), ("tokenizer.train_samples=20",)):
            config = one_source(root, "p", workers, "tokenizer.kind=bpe", "tokenizer.vocab_size=300", *extra)
            build_tokenizer(config)  # what prepare_tokenizer and `hf-streamlm tokenizer` run
            assert seen[-1] == list(iter_texts(config, limit=tokenizer_doc_limit(config)))
            samples.append(seen[-1])
    full, part = samples[0], samples[1]
    assert len(full) == CAP and set(full) == capped  # the whole capped pass
    assert len(part) == 20 and set(part) <= capped
    assert {t.split("x")[0] for t in part} == {f"p{i}" for i in range(SHARDS)}  # spread: 2 or 3 from each shard
    assert samples == [full, part] * len(LAYOUTS)  # whatever the layout


@pytest.mark.timeout(300)
def test_a_shard_shorter_than_its_quota_makes_the_pass_shorter(tmp_path, tokenizer, caplog):
    sizes = [12, 12, 12, 2, 12, 12, 12, 12]  # shard 3 holds 2 of its 5
    texts = write_source(tmp_path, "s", SHARDS, sizes)
    expected = keys(t for shard in texts.values() for t in shard[:CAP // SHARDS])
    assert len(expected) == 37
    with caplog.at_level(logging.WARNING, logger="hf_streamlm.data.cap"):
        for ranks, workers in LAYOUTS:
            docs = trained_pass(lambda w: one_source(tmp_path, "s", w), tokenizer, ranks, workers)
            assert set(docs) == expected and sum(docs.values()) == 37, (ranks, workers)
    assert any("shard 3 of 8" in m and "2 of its 5" in m for m in caplog.messages)


@pytest.mark.timeout(300)
def test_a_capped_mixture_is_the_same_documents_on_every_layout(tmp_path, tokenizer):
    """Two sources (8 and 4 shards): shard j of the mixture is shard j of each source (source a's shards
    2j and 2j+1), mixed with a generator of its own; its first 10 mixed documents are the same on every
    layout, and so is the number drawn from each source."""
    a = write_source(tmp_path, "a", 8, 12)
    b = write_source(tmp_path, "b", 4, 12, start=1000)
    sources = (f"[{{path: json, data_files: '{tmp_path}/a-*.jsonl', weight: 2}}, "
               f"{{path: json, data_files: '{tmp_path}/b-*.jsonl', weight: 1}}]")
    passes = [trained_pass(lambda w: config_for(sources, w), tokenizer, ranks, workers) for ranks, workers in LAYOUTS]
    assert all(p == passes[0] for p in passes)
    assert sum(passes[0].values()) == CAP and set(passes[0].values()) == {1}
    per_source = Counter(source for source, _ in passes[0])
    assert per_source[0] > per_source[1] > 0
    everything = keys(t for s in a.values() for t in s) | keys((t for s in b.values() for t in s), 1)
    assert set(passes[0]) <= everything
    # Layout-free per source too, at the stream level (and for the layouts the loader does not run here).
    rows = [sorted(reader_texts(config_for(sources, 0), r, w)) for r, w in [*LAYOUTS, (4, 1), (2, 0)]]
    assert all(r == rows[0] for r in rows) and len(rows[0]) == CAP
    # The tokenizer's sample of the mixture: part of the pass, from both sources.
    sample = {(source, f"{document_key(t):016x}") for t, source in iter_rows(config_for(sources, 0), limit=20)}
    assert len(sample) == 20 and sample <= set(passes[0]) and {s for s, _ in sample} == {0, 1}


def test_a_source_cap_is_per_shard_too(corpus):
    root, texts = corpus
    sources = f"[{{path: json, data_files: '{root}/p-*.jsonl', max_samples: 16}}]"
    expected = sorted(t for shard in texts.values() for t in shard[:2])
    for ranks, workers in LAYOUTS:
        config = config_for(sources, workers, "data.max_samples=null")
        assert sorted(reader_texts(config, ranks, workers)) == expected, (ranks, workers)


@pytest.mark.parametrize("stop", [3, 5, 6, 17])
def test_the_capped_stream_resumes_mid_pass_from_its_state(corpus, stop):
    """``datasets``' state_dict through the cap: inside a shard's quota, at its end, past it."""
    root, _ = corpus
    source_cap = config_for(f"[{{path: json, data_files: '{root}/p-*.jsonl', max_samples: 24}}]", 0,
                            "data.max_samples=null", "data.min_words=2")  # under the source's map and a filter
    mixture = config_for(f"[{{path: json, data_files: '{root}/p-*.jsonl', weight: 2}}, "
                         f"{{path: json, data_files: '{root}/m-*.jsonl'}}]", 0)  # the mixture's generator too
    for config, ranks, workers, rank, worker in [(one_source(root), 1, 0, 0, 0), (one_source(root), 2, 2, 1, 1),
                                                 (source_cap, 1, 0, 0, 0), (source_cap, 2, 2, 0, 1),
                                                 (mixture, 1, 0, 0, 0), (mixture, 2, 2, 1, 0)]:
        ds, _ = _rank_texts(config, rank, ranks, "capped-resume")
        whole = [r["text"] for r in ShareStream(ds, workers, worker)]
        first = ShareStream(ds, workers, worker)
        it = iter(first)
        head = [next(it)["text"] for _ in range(min(stop, len(whole)))]
        state = first.state_dict()
        again, _ = _rank_texts(config, rank, ranks, "capped-resume")
        resumed = ShareStream(again, workers, worker)
        resumed.load_state_dict(state)
        assert head + [r["text"] for r in resumed] == whole, (ranks, workers)


@pytest.mark.timeout(300)
def test_the_training_loader_resumes_exactly_on_a_capped_stream(corpus, tokenizer, monkeypatch):
    """The loader's state (source positions at anchors every 3 documents, so that ``datasets``' state of
    the capped stream is what a resume loads) gives the batches the uninterrupted loader gives."""
    monkeypatch.setattr(stream_module, "ANCHOR_EVERY", 3)
    root, _ = corpus
    for workers in (0, 2):
        config = one_source(root, "p", workers)
        make = functools.partial(build_train_loader, config, tokenizer,
                                 functools.partial(make_collator, config, tokenizer), 0, 1)
        whole = [b["input_ids"].tolist() for b in itertools.islice(iter(make()), 30)]
        first = make()
        it = iter(first)
        for _ in range(11):
            next(it)
        state = first.state_dict()
        del it
        resumed = make()
        resumed.load_state_dict(state)
        assert [b["input_ids"].tolist() for b in itertools.islice(iter(resumed), 19)] == whole[11:], workers


def test_stats_measures_the_capped_pass(corpus, tokenizer):
    from hf_streamlm.data.stats import pipeline_stats

    root, _ = corpus
    stats = pipeline_stats(one_source(root, "p", 2), tokenizer, CAP)
    assert stats["docs"] == CAP


def test_the_rule_spreads_the_cap_over_the_shards_it_can_afford():
    assert shard_quotas(8, 40) == [5] * 8 and shard_quotas(8, 43) == [6, 6, 6, 5, 5, 5, 5, 5]
    assert capped_shards(8, 40) == 8 and capped_shards(64, 10) == 64  # every shard of a stream of up to 64
    # A stream of thousands of files (FineWeb): a power of two of them, about 1,024+ documents each.
    assert capped_shards(25_000, 1_000_000) == 512 and shard_quotas(25_000, 1_000_000)[0] == 1954
    assert capped_shards(25_000, 1_000) == 64 and capped_shards(25_000, 10**9) == 25_000
    # A sample of the pass takes a prefix of each shard's part: q'_j <= q_j, the same shards.
    for shards, cap in ((8, 40), (25_000, 1_000_000), (100, 131_072), (3, 7)):
        for take in (1, 5, cap // 3, cap - 1, cap):
            sample, whole = shard_quotas(shards, cap, take), shard_quotas(shards, cap)
            assert len(sample) == len(whole) and sum(sample) == take
            assert all(a <= b for a, b in zip(sample, whole)), (shards, cap, take)


def test_a_position_saved_by_take_is_refused_in_one_line(corpus):
    """A checkpoint of the version that capped with ``take`` points into other documents."""
    from hf_streamlm.config import ConfigError

    root, _ = corpus
    config = one_source(root)
    ds, _ = _rank_texts(config, 0, 1, "capped-old")
    old = ds.take(3)  # what _rank_texts wrapped the stream in before
    rows = iter(old)
    next(rows)
    state = old.state_dict()
    assert state["examples_iterable"]["type"] == "TakeExamplesIterable"
    ds.load_state_dict(state)
    with pytest.raises(ConfigError, match=r"was a `take` of the stream's first documents.*start a new runtime.output_dir"):
        next(iter(ds))
