"""Data mixtures that change during a run (``data.schedule``, ``data.mix_by``, ``data.mlm_probability`` as stages):
the configuration's one-line errors, the realized shares against the schedule, exact resume before, at and after a
stage boundary (0 and 2 DataLoader workers), an elastic resume across a boundary (every document of each source's
pass once), and the masking rate's stages. The launched runs (2 processes, losses bit-equal) are in
``tests/test_mixture_run.py``."""

from __future__ import annotations

import copy
import functools
import itertools
import json
from collections import Counter

import pytest
import torch

from hf_streamlm.config import ConfigError, load_config
from hf_streamlm.data.collate import make_collator
from hf_streamlm.data.documents import document_key
from hf_streamlm.data.elastic import origins
from hf_streamlm.data.pipeline import build_train_loader, reader_settings
from hf_streamlm.tokenizer import train_tokenizer

BOUNDARY = 3200  # tokens: stage 0 ends here (absolute, so the same on every layout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """``web``: short documents (about 8 tokens), ``edu``: long ones (about 45), 4 shards each, distinct texts."""
    root = tmp_path_factory.mktemp("mixture")
    docs: dict[int, list[str]] = {0: [], 1: []}
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    for source, (name, length, per_shard) in enumerate((("web", 5, 30), ("edu", 40, 12))):
        for shard in range(4):
            lines = []
            for d in range(per_shard):
                text = f"{name}{shard}x{d:03d} " + " ".join(words[(d + i) % 10] for i in range(length))
                lines.append(json.dumps({"text": text}))
                docs[source].append(text)
            (root / f"{name}-{shard}.jsonl").write_text("\n".join(lines) + "\n")
    texts = docs[0] + docs[1]
    return root, docs, {"decoder": train_tokenizer(texts, "bpe", vocab_size=300, min_frequency=1),
                        "microbert": train_tokenizer(texts, "wordpiece", vocab_size=200, min_frequency=1)}


def config_for(root, workers=0, family="decoder", *extra):
    recipe = "quickstart" if family == "microbert" else "quickstart_decoder"
    sources = f"[{{path: json, data_files: '{root}/web-*.jsonl', label: web}}, " \
              f"{{path: json, data_files: '{root}/edu-*.jsonl', label: edu}}]"
    schedule = f"[{{until: {BOUNDARY}, weights: {{web: 0.8, edu: 0.2}}}}, " \
               "{until: 1.0, weights: {web: 0.2, edu: 0.8}}]"
    return load_config([f"recipe={recipe}", f"data.sources={sources}", f"data.num_workers={workers}",
                        "data.batch_size=2", "data.sequence_length=32", "data.shuffle_buffer_size=16",
                        "data.block_shuffle_size=4", "data.eval_holdout=0", "data.mix_by=tokens",
                        f"data.schedule={schedule}", "data.document_masking=true", "data.trace_documents=true",
                        "scheduler.total_steps=200", *extra])


def loader(config, tokenizer, rank=0, world=1):
    return build_train_loader(config, tokenizer, functools.partial(make_collator, config, tokenizer), rank, world)


def same(a, b) -> bool:
    eq = lambda u, v: torch.equal(u, v) if torch.is_tensor(u) else u == v  # noqa: E731
    return len(a) == len(b) and all(x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize(("schedule", "message"), [
    ("[{until: 0.5, weights: {wbe: 1}}]", "names 'wbe', which is no source; the sources are: web, edu"),
    ("[{until: 0.8, weights: {web: 1}}, {until: 0.5, weights: {edu: 1}}]", "stages are out of order"),
    ("[{until: 99999999, weights: {web: 1}}]", "the schedule is longer than the run"),
    ("[{until: 0.5, weights: {web: 0, edu: 0}}]", "are all 0"),
    ("[{until: 0.5, weights: {web: 1}, interpolate: cubic}]", "must be none or linear"),
    ("[{until: 0.5, weigths: {web: 1}}]", "unknown key(s) weigths"),
])
def test_a_bad_schedule_is_one_line_naming_it(corpus, schedule, message):
    root, _, tokenizers = corpus
    with pytest.raises(ConfigError, match=None) as err:
        config = config_for(root, 0, "decoder", f"data.schedule={schedule}")
        loader(config, tokenizers["decoder"])  # (the run's length is known here: a longer schedule is refused)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_fraction_needs_a_token_budget(corpus):
    root, _, _ = corpus
    with pytest.raises(ConfigError, match="has no token budget"):
        config = config_for(root, 0, "decoder", "scheduler.total_steps=null", "scheduler.total_epochs=1")
        from hf_streamlm.data.schedule import mixture_schedule
        mixture_schedule(config, 1)


def shares(stage_tokens: dict) -> dict[int, float]:
    """Stage -> web's share of the stage's tokens."""
    return {stage: counts.get(0, 0) / sum(counts.values()) for stage, counts in stage_tokens.items()}


@pytest.mark.parametrize("mix_by", ["tokens", "documents"])
def test_each_source_gets_its_share_of_tokens_or_documents(corpus, mix_by):
    """By tokens, the short-document source gets 80% of the tokens in stage 0 (by documents it would get ~40%); by
    documents, 80% of the documents (and far less of the tokens)."""
    root, _, tokenizers = corpus
    config = config_for(root, 0, "decoder", f"data.mix_by={mix_by}")
    ld = loader(config, tokenizers["decoder"])
    ended: dict[int, Counter] = {0: Counter(), 1: Counter()}  # stage -> documents that ended in it, by source
    for i, _ in enumerate(itertools.islice(iter(ld), 100)):  # 64 tokens a batch: the boundary (3,200) is batch 50
        ended[int(i >= 50)].update(source for source, _, _ in ld.take_documents())
    stage, stage_tokens, _ = ld.mixture()
    assert stage == 1 and set(stage_tokens) == {0, 1}
    assert sum(stage_tokens[0].values()) == BOUNDARY and sum(stage_tokens[1].values()) == 6400 - BOUNDARY
    global_batch = 2 * 32
    web = shares(stage_tokens)
    if mix_by == "tokens":
        assert abs(web[0] - 0.8) * BOUNDARY <= global_batch and abs(web[1] - 0.2) * 3200 <= global_batch, web
        assert ended[0][0] / sum(ended[0].values()) > 0.9  # 80% of the tokens: far more of the documents
    else:
        documents = {stage: counts[0] / sum(counts.values()) for stage, counts in ended.items()}
        assert abs(documents[0] - 0.8) < 0.05 and abs(documents[1] - 0.2) < 0.06, documents
        assert web[0] < 0.5  # 80% of the documents are the short ones: far less of the tokens


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_before_at_and_after_the_boundary_is_exact(corpus, workers):
    root, _, tokenizers = corpus
    tokenizer = tokenizers["decoder"]
    config = config_for(root, workers)
    straight = list(itertools.islice(iter(loader(config, tokenizer)), 80))
    # 64 tokens a batch: the boundary (3,200 tokens) is batch 50.
    for stop in (44, 50, 56):
        first = loader(config, tokenizer)
        head = list(itertools.islice(iter(first), stop))
        state = copy.deepcopy(first.state_dict())
        again = loader(config, tokenizer)
        again.load_state_dict(state)
        tail = list(itertools.islice(iter(again), 80 - stop))
        assert same(head + tail, straight), f"stopped at batch {stop}"


def test_an_elastic_resume_across_the_boundary_keeps_each_source_pass_once(corpus):
    """2 ranks stopped before the boundary, resumed on 1 rank with 2 DataLoader workers past it: every document of
    each source's passes is trained once (the trace of all readers together), and the realized shares keep the
    schedule within one global batch."""
    root, docs, tokenizers = corpus
    tokenizer = tokenizers["decoder"]
    want = {s: Counter(f"{document_key(t):016x}" for t in docs[s]) for s in (0, 1)}
    old_config = config_for(root, 0)
    old = [loader(old_config, tokenizer, r, 2) for r in range(2)]
    its = [iter(ld) for ld in old]
    trace = []
    for _ in range(20):  # 20 steps of 2 ranks x 2 sequences: 2,560 tokens, before the boundary
        for ld, it in zip(old, its):
            next(it)
            trace += ld.take_documents()
    states = [copy.deepcopy(ld.state_dict()) for ld in old]
    # Each source's readers are passes ahead (a tokenizing chunk is 256 documents, a reader's pass 12 or 30): the
    # passes in flight must be finished from the old readers' shares, per source.
    read = [s["read_epochs"][0] for s in states]
    assert all(isinstance(r, list) and r[1] >= 2 for r in read), read
    new_config = config_for(root, 2)
    new = loader(new_config, tokenizer)
    new.load_elastic(origins(states, 1, new.num_workers, 0, reader_settings(old_config, 2, 0)),
                     min(s["epoch"] for s in states))
    it = iter(new)
    # Each source's old readers read many passes ahead (their tokenizing chunks): train until every source's trace
    # is two passes past the newest one any old reader had started.
    ahead = [max(r[source] for r in read) + 2 for source in (0, 1)]
    newest = [0, 0]
    for _ in range(3000):
        next(it)
        for source, key, epoch in new.take_documents():
            trace.append([source, key, epoch])
            newest[source] = max(newest[source], epoch)
        if newest[0] >= ahead[0] and newest[1] >= ahead[1]:
            break
    assert newest[0] >= ahead[0] and newest[1] >= ahead[1], (newest, ahead)
    by_pass: dict[tuple[int, int], Counter] = {}
    for source, key, epoch in trace:
        by_pass.setdefault((source, epoch), Counter())[key] += 1
    for source in (0, 1):
        # Every pass the old readers had started is trained whole (the run goes on past the pass after them: the
        # block shuffle may still hold the last blocks of the pass before the newest one traced).
        for epoch in range(newest[source] - 1):
            got = by_pass[(source, epoch)]
            assert got == want[source], (source, epoch, len(want[source] - got), sum(n > 1 for n in got.values()))
    stage, stage_tokens, _ = new.mixture()
    assert stage == 1
    web = shares(stage_tokens)
    global_batch = 2 * 2 * 32
    assert abs(web[0] - 0.8) * sum(stage_tokens[0].values()) <= global_batch, web


def masked_share(batch) -> float:
    labels = batch["labels"]
    return float((labels != -100).sum()) / float((batch["attention_mask"] if "attention_mask" in batch else
                                                  torch.ones_like(labels)).sum())


def test_the_masking_rate_follows_its_stages_and_resumes_exactly(corpus):
    """``data.mlm_probability`` as stages (mmBERT's 0.3 -> 0.15 -> 0.05, by tokens): each batch is masked at its
    stage's rate; a resume continues the rates and the masks bit for bit."""
    root, _, tokenizers = corpus
    tokenizer = tokenizers["microbert"]
    rates = "[{until: 0.3, value: 0.3}, {until: 0.6, value: 0.15}, {until: 1.0, value: 0.05}]"
    config = config_for(root, 0, "microbert", "data.schedule=[]", "data.mix_by=documents",
                        f"data.mlm_probability={rates}", "scheduler.total_steps=60", "data.document_masking=false",
                        "data.batch_size=8")
    batches = list(itertools.islice(iter(loader(config, tokenizer)), 60))  # 60 x 8 x 32 = the run's budget
    thirds = [sum(masked_share(b) for b in part) / len(part) for part in (batches[2:16], batches[20:34],
                                                                        batches[40:58])]
    assert abs(thirds[0] - 0.3) < 0.04 and abs(thirds[1] - 0.15) < 0.03 and abs(thirds[2] - 0.05) < 0.02, thirds
    first = loader(config, tokenizer)
    head = list(itertools.islice(iter(first), 25))
    again = loader(config, tokenizer)
    again.load_state_dict(copy.deepcopy(first.state_dict()))
    assert same(head + list(itertools.islice(iter(again), 35)), batches)
