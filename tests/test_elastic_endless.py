"""Elastic resume on an endless stream, and the positions of handed-over tokens (issue 25).

After a layout change a new reader reads the old readers' rest of the passes they had started; on an
endless stream (``runpod_1b_unlimited``) pass 0 never ends, so it does so for good. Its data state must stay
bounded and its resume cost flat however many batches it made since the change, a same-layout resume must
still give the uninterrupted run's batches bit for bit, and a further layout change must work. The stream
here is a local source whose pass 0 does not end during the test (6,000 documents per reader), in one
process (rank loaders stepped in lock step, as tests/test_elastic_stream.py does).

On main before issue 25 the state of such a reader was ``{"replay": origin, "batches": n}``: a resume rebuilt
the old readers and replayed every batch made since the change (50, 400, 1,600), and a second layout change
was refused.

The packing content an old reader holds at the change (tokens already cut from the text) is handed out in
the blocks it would have made next, so each handed-over token keeps its place in its block: its
``position_ids`` and document segment are the uninterrupted run's."""

from __future__ import annotations

import copy
import functools
import io
import json
import time
from collections import Counter

import pytest
import torch

from hf_streamlm.config import load_config
from hf_streamlm.data.collate import make_collator
from hf_streamlm.data.documents import document_key
from hf_streamlm.data.elastic import origins
from hf_streamlm.data.pipeline import build_train_loader, reader_settings
from hf_streamlm.data.stream import ANCHOR_EVERY, WorkerPipeline
from hf_streamlm.tokenizer import train_tokenizer
from tests.conftest import two_source_corpus

MARKS = (50, 400, 1600)  # batches since the layout change at which the state is taken
AFTER = 12  # batches compared after each resume
PER_SHARD = 6000  # documents per shard (one shard per old reader): more than the test reads of one


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """One source of 4 jsonl shards, far longer than the test reads, and a BPE trained on it."""
    root = tmp_path_factory.mktemp("endless")
    texts, n = [], 0
    for shard in range(4):
        lines = []
        for _ in range(PER_SHARD):
            text = f"d{n:06d} " + " ".join(f"w{(n * 7 + i) % 40}" for i in range(2 + n % 5))
            lines.append(json.dumps({"text": text}))
            texts.append(text)
            n += 1
        (root / f"a-{shard}.jsonl").write_text("\n".join(lines) + "\n")
    tokenizer = train_tokenizer(texts[:2000], "bpe", vocab_size=300, min_frequency=1)
    return f"[{{path: json, data_files: '{root}/a-*.jsonl'}}]", set(texts), tokenizer


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """tests/test_elastic_stream.py's corpus: two sources, tiny shares (many passes held at a stop)."""
    root = tmp_path_factory.mktemp("elastic-small")
    docs = two_source_corpus(root, (8, 4))
    sources = f"[{{path: json, data_files: '{root}/a-*.jsonl', weight: 2}}, " \
              f"{{path: json, data_files: '{root}/b-*.jsonl', weight: 1}}]"
    tokenizer = train_tokenizer(docs[0] + docs[1], "bpe", vocab_size=300, min_frequency=1)
    return sources, docs, tokenizer


def config_for(sources: str, workers: int, extra: tuple[str, ...] = ()):
    return load_config(["recipe=quickstart_decoder", f"data.sources={sources}", f"data.num_workers={workers}",
                        "data.batch_size=1", "data.sequence_length=32", "data.shuffle_buffer_size=8",
                        "data.block_shuffle_size=0",  # the order-based checks; two tests set it in `extra`
                        "data.eval_holdout=0", "data.trace_documents=true", "data.document_masking=true", *extra])


def loaders(sources, tokenizer, processes, workers, extra=()):
    config = config_for(sources, workers, extra)
    return [build_train_loader(config, tokenizer, functools.partial(make_collator, config, tokenizer), r, processes)
            for r in range(processes)]


def hand_over(states, sources, tokenizer, before, after, extra=()):
    """The loaders of layout ``after`` started from the ``before`` layout's rank ``states``."""
    old = config_for(sources, before[1], extra)
    settings = reader_settings(old, *before)
    new = loaders(sources, tokenizer, *after, extra)
    for rank, ld in enumerate(new):
        ld.load_elastic(origins(states, after[0], ld.num_workers, rank, settings), min(s["epoch"] for s in states))
    return new


def take(lds, its, batches: int, trace: list, out: list | None = None) -> None:
    """``batches`` batches of every rank, in lock step; the documents that ended in them go to ``trace``."""
    for _ in range(batches):
        for ld, it in zip(lds, its):
            batch = next(it)
            if out is not None:
                out.append({k: v.clone() for k, v in batch.items() if torch.is_tensor(v)})  # not the flash kernels' ints
            trace.extend(tuple(d) for d in ld.take_documents())


def size(state) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return len(buffer.getvalue())


class Counting:
    """Counts, while on, the rows read from a source (by a reader not itself reading through old readers) and
    the batches made."""

    def __init__(self, monkeypatch):
        self.rows = self.batches = 0
        self.on = False
        read, batch = WorkerPipeline._read, WorkerPipeline.next_batch

        def counted_read(pipeline):
            doc = read(pipeline)
            self.rows += self.on and doc is not None and pipeline.prelude is None
            return doc

        def counted_batch(pipeline):
            self.batches += self.on
            return batch(pipeline)

        monkeypatch.setattr(WorkerPipeline, "_read", counted_read)
        monkeypatch.setattr(WorkerPipeline, "next_batch", counted_batch)


@pytest.fixture(scope="module")
def endless_run(endless):
    """2 ranks x 2 workers stopped after 2 batches each, then 1 process without workers for 1,600 batches and
    more: its states at MARKS, its batches, and the trace of all of it."""
    sources, _, tokenizer = endless
    old = loaders(sources, tokenizer, 2, 2)
    trace: list = []
    its = [iter(ld) for ld in old]
    take(old, its, 2, trace)
    states = [copy.deepcopy(ld.state_dict()) for ld in old]
    for it in its:
        it.close()  # the DataLoader workers stop
    new = hand_over(states, sources, tokenizer, (2, 2), (1, 0))
    it = iter(new[0])
    marks, straight, upto = {}, [], 0
    for n in range(1, MARKS[-1] + AFTER + 1):
        take(new, [it], 1, trace, straight)
        if n in MARKS:
            marks[n] = copy.deepcopy(new[0].state_dict())
            upto = len(trace)
    return marks, straight, trace[:upto]


def test_state_and_resume_cost_stay_flat_on_an_endless_stream(endless, endless_run, monkeypatch):
    """After 50, 400 and 1,600 batches since a 2x2 -> 1x0 change: the state is anchored (no replay record)
    and does not grow, a resume makes no batch and re-reads a bounded span (not the batches since the
    change), and the resumed batches equal the uninterrupted run's bit for bit."""
    sources, _, tokenizer = endless
    marks, straight, _ = endless_run
    counting = Counting(monkeypatch)
    figures = {}
    for n, state in marks.items():
        snapshot = state["workers"][0]["snapshot"]
        assert "replay" not in snapshot and "anchor" in snapshot
        pipeline = loaders(sources, tokenizer, 1, 0)[0].stream.make_pipeline(0)
        counting.rows = counting.batches = 0
        counting.on, started = True, time.perf_counter()
        pipeline.load_state_dict(snapshot)
        counting.on = False
        figures[n] = (size(state), counting.rows, counting.batches, time.perf_counter() - started)
        resumed = [pipeline.next_batch() for _ in range(AFTER)]
        for got, want in zip(resumed, straight[n:n + AFTER]):
            assert {k: v for k, v in got.items() if isinstance(v, torch.Tensor)}.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in want), f"a batch after the resume at {n} differs"
    print("batches since the change: (state bytes, source rows re-read, batches made, load seconds)", figures)
    states, rows, made, _ = zip(*figures.values())
    assert made[1] == made[2] == 0  # 50: the old readers' snapshots replay their few batches (skip), once
    assert made[0] <= 4 * 16
    # The re-read is the span since the live anchor, for the new reader and (while the origin is kept) the
    # old readers: at most an anchor interval plus what the buffers and tokenizing chunks hold, whatever n.
    bound = 5 * (ANCHOR_EVERY + 2 * 256 + 8)
    assert max(rows) <= bound, rows
    assert states[2] <= states[1] <= states[0]  # bounded: the origin and the handed-over blocks are let go
    assert "origin" not in marks[1600]["workers"][0]["snapshot"]


def test_a_second_layout_change_while_reading_taken_over_passes(endless, endless_run):
    """The 1x0 reader, 1,600 batches into the old readers' endless pass 0, is handed out again (1x0 -> 2x0):
    accepted, and the trace over all three layouts lists no document of the pass twice."""
    sources, texts, tokenizer = endless
    marks, _, trace = endless_run
    state = marks[1600]
    assert "prelude" in state["workers"][0]["snapshot"]["anchor"][2]  # still in the passes taken over
    again = hand_over([state], sources, tokenizer, (1, 0), (2, 0))
    after: list = []
    take(again, [iter(ld) for ld in again], 300, after)
    seen = Counter((s, k) for s, k, e in trace + after if e == 0)
    keys = {f"{document_key(t):016x}" for t in texts}
    assert all(k in keys for _, k in seen) and len(after) > 300
    duplicated = [d for d, n in seen.items() if n > 1]
    assert not duplicated, f"{len(duplicated)} documents of pass 0 read twice"


def segments(blocks: list[tuple[list[int], list[int]]], limit: int | None = None) -> list[tuple]:
    """``((token, position), ...)`` per document segment of ``blocks`` (a segment starts at position 0 and at
    each block start), over the first ``limit`` tokens."""
    out, cur, seen = [], [], 0
    for ids, pos in blocks:
        for i, (t, p) in enumerate(zip(ids, pos)):
            if limit is not None and seen == limit:
                break
            if (p == 0 or i == 0) and cur:
                out.append(tuple(cur))
                cur = []
            cur.append((t, p))
            seen += 1
    if cur:
        out.append(tuple(cur))
    return out


def rows(batches) -> list[tuple[list[int], list[int]]]:
    return [(ids, pos) for b in batches for ids, pos in zip(b["input_ids"].tolist(), b["position_ids"].tolist())]


@pytest.mark.parametrize(("before", "after"), [((2, 0), (1, 0)), ((1, 0), (2, 0)), ((4, 0), (1, 0))],
                         ids=["2x0-1x0", "1x0-2x0", "4x0-1x0"])
def test_handed_over_tokens_keep_their_positions(small, before, after):
    """Every document segment of the old readers' packing content at the change (tokens with their
    ``position_ids``, as the uninterrupted run trains them) is a whole segment of the new layout's blocks. On
    main before issue 25, 265 of 683 (2x0 -> 1x0), 98 of 335 and 402 of 1,350 were cut or shifted."""
    sources, _, tokenizer = small
    extra = ("data.stopping_strategy=all_exhausted_without_replacement",)
    old = loaders(sources, tokenizer, *before, extra)
    its = [iter(ld) for ld in old]
    for it in its:
        next(it)
    states = [copy.deepcopy(ld.state_dict()) for ld in old]
    held = [len(ld.stream.live.tokens) for ld in old]  # each rank's packing content: its next tokens
    want: Counter = Counter()
    for it, n in zip(its, held):
        want.update(segments(rows([next(it) for _ in range(n // 32 + 2)]), limit=n))
    got: Counter = Counter()
    for ld in hand_over(states, sources, tokenizer, before, after, extra):
        it = iter(ld)
        got.update(segments(rows([next(it) for _ in range(sum(held) // 32 + 4)])))
    cut = want - got
    assert not cut, f"{sum(cut.values())} of {sum(want.values())} handed-over segments cut or shifted"


def equal(got: list[dict], want: list[dict]) -> bool:
    return len(got) == len(want) and all(g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w)
                                         for g, w in zip(got, want))


@pytest.mark.parametrize(("before", "after"), [((1, 0), (2, 0)), ((2, 2), (1, 0))], ids=["1x0-2x0", "2x2-1x0"])
def test_a_same_layout_resume_anywhere_after_a_layout_change_is_exact(small, before, after):
    """Tiny shares: the passes taken over end every few batches, the handed-over documents run out, the
    origin is let go, the taken-over passes end and the readers' own shares begin. A resume from the state
    after every 24th of the first 240 batches since the change gives the uninterrupted run's next batches
    (the endless test resumes from anchors in the passes taken over without the origin)."""
    sources, _, tokenizer = small
    extra = ("data.stopping_strategy=all_exhausted_without_replacement", "data.sequence_length=128",
             "data.block_shuffle_size=4")
    old = loaders(sources, tokenizer, *before, extra)
    its = [iter(ld) for ld in old]
    take(old, its, 1, [])
    states = [copy.deepcopy(ld.state_dict()) for ld in old]
    for it in its:
        it.close()
    new = hand_over(states, sources, tokenizer, before, after, extra)
    its = [iter(ld) for ld in new]
    marks, straight = [], [[] for _ in new]
    for _ in range(240 + AFTER):
        marks.append([copy.deepcopy(ld.state_dict()) for ld in new])
        for ld, it, out in zip(new, its, straight):
            take([ld], [it], 1, [], out)
    kinds = Counter()
    for n in range(0, 240, 24):
        for rank, state in enumerate(marks[n]):
            snapshot = state["workers"][0]["snapshot"]
            source = snapshot.get("anchor", (0, 0, {"prelude": None}))[2]
            kinds["prelude" if isinstance(source, dict) and "prelude" in source else "native"] += 1
            kinds["origin"] += "origin" in snapshot
            again = loaders(sources, tokenizer, *after, extra)[rank]
            again.load_state_dict(state)
            resumed: list = []
            take([again], [iter(again)], AFTER, [], resumed)
            assert equal(resumed, straight[rank][n:n + AFTER]), f"rank {rank}: resumed after {n} batches differs"
    # The resumes covered both kinds of state: in the passes taken over (with the origin), and the readers' own.
    assert kinds["prelude"] and kinds["origin"] and kinds["native"], kinds


def first_passes(trace) -> dict[int, Counter]:
    out: dict[int, Counter] = {}
    for source, key, epoch in trace:
        out.setdefault(epoch, Counter())[(source, key)] += 1
    return out


def test_every_document_of_each_pass_once_over_three_layout_changes(small):
    """2x0 -> 1x0 -> 2x0 -> 1x2, the second and third changes while the readers still read passes taken over
    at the one before (a reader handed out is itself reading through old readers); a same-layout resume there
    is exact too. Passes 0 and 1 list every document exactly once over the four layouts."""
    sources, docs, tokenizer = small
    extra = ("data.stopping_strategy=all_exhausted_without_replacement", "data.block_shuffle_size=4")
    want = Counter((s, f"{document_key(t):016x}") for s in (0, 1) for t in docs[s])
    trace: list = []
    layouts = [((2, 0), 1), ((1, 0), 8), ((2, 0), 8), ((1, 2), 60)]
    lds = loaders(sources, tokenizer, *layouts[0][0], extra)
    for i, (layout, batches) in enumerate(layouts):
        its = [iter(ld) for ld in lds]
        take(lds, its, batches, trace)
        if i == 2:  # a same-layout resume of readers whose old readers are themselves in taken-over passes
            middle = [copy.deepcopy(ld.state_dict()) for ld in lds]
            straight: list = []
            take(lds, its, 4, trace, straight)
            again = loaders(sources, tokenizer, *layout, extra)
            for ld, state in zip(again, middle):
                ld.load_state_dict(state)
            resumed: list = []
            take(again, [iter(ld) for ld in again], 4, [], resumed)
            assert equal(resumed, straight)
        states = [copy.deepcopy(ld.state_dict()) for ld in lds]
        for it in its:
            it.close()
        if i + 1 < len(layouts):
            if i:  # handed out while still reading the passes taken over at the change before
                assert all("prelude" in w["snapshot"]["anchor"][2] for s in states for w in s["workers"].values())
            lds = hand_over(states, sources, tokenizer, layout, layouts[i + 1][0], extra)
    got = first_passes(trace)
    for epoch in (0, 1):
        assert got[epoch] == want, (f"pass {epoch}: {len(want - got[epoch])} missing, "
                                    f"{sum(n - 1 for n in got[epoch].values() if n > 1)} duplicated")
    assert all(n == 1 for c in got.values() for n in c.values())
