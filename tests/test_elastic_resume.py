"""Elastic resume (issue #17): a run stopped at a checkpoint resumes on another layout -- shrunk from 2
processes x 2 DataLoader workers to 1 process without workers, and grown the other way, under a real
``accelerate launch`` (2 CPU processes, gloo) -- and the document trace (``data.trace_documents``) shows
that within the first pass every document of the sources was trained on exactly once: 0 duplicated,
0 missing, with the run going on past the end of the first pass of every source. Both model families,
each on a weighted mixture of two sources. The stop is a copy of a finished run's folder without its
checkpoints after the stop step (what a run stopped there leaves, trace lines past it included: the
resume drops them), so nothing depends on when a kill lands.

The sizes are small on purpose, and they are the hard case: each reader's share of a pass (18 documents
with 4 readers) is much smaller than a tokenizing chunk (256 documents), so at the stop every old reader
holds many passes in flight (packing remainder, chunk in the tokenizer, shuffle buffer). The one-process
runs are ``main`` in the test process (conftest ``run_in_process``), the two-process ones real launches."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from hf_streamlm.data.stream import document_key
from hf_streamlm.data.trace import read_trace
from tests.conftest import run_in_process_stdout, two_source_corpus
from tests.test_resume_run import launch

STOP = 3  # the checkpoint the run is resumed from: inside the first pass
STEPS = 16  # the first pass ends at step 10-11 in both directions (measured): a margin of 5


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """Two sources of 4 jsonl shards each (so that 2 ranks x 2 workers all read whole shards): 48 and
    24 short documents, each text distinct."""
    root = tmp_path_factory.mktemp("elastic")
    docs = two_source_corpus(root, (12, 6))
    return root, docs


def args(recipe: str, sources: str, tokenizer, workers: int, accumulation: int, total: int) -> list[str]:
    return [f"recipe={recipe}", f"data.sources={sources}", f"tokenizer.path={tokenizer}",
            "data.stopping_strategy=all_exhausted_without_replacement", f"data.num_workers={workers}",
            f"data.gradient_accumulation_steps={accumulation}", "data.batch_size=2", "data.sequence_length=32",
            "data.shuffle_buffer_size=16", "data.eval_holdout=0", "data.trace_documents=true",
            "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
            "model.max_position_embeddings=64", f"scheduler.total_steps={total}",
            "scheduler.warmup_steps=1", "runtime.log_every_n_steps=1", f"runtime.checkpoint.every_n_steps={STOP}",
            "runtime.checkpoint.max_keep=100", f"runtime.evaluation.every_n_steps={total}",
            "runtime.logging.progress_bar=false", "runtime.logging.tensorboard=false", "runtime.demo_sentences=[]"]


def run_to_end(args: list[str], processes: int, capsys, caplog) -> tuple[str, str]:
    """The run to its end; its stdout, and its stderr (in process: its log records)."""
    if processes == 1:
        caplog.clear()
        return run_in_process_stdout(capsys, *args), caplog.text
    proc = launch(args, processes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def stopped_copy(run, target):
    """``run`` as a run stopped right after its checkpoint of step STOP would have left it."""
    shutil.copytree(run, target)
    for ckpt in (target / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > STOP:
            shutil.rmtree(ckpt)
    shutil.rmtree(target / "export", ignore_errors=True)


def first_pass(run) -> Counter:
    """``(source, key)`` of every pass-0 entry of all trace files of ``run``, with their counts."""
    return Counter((source, key) for path in (run / "trace").glob("rank-*.jsonl") for row in read_trace(path)
                   for source, key, epoch in row["docs"] if epoch == 0)


def expected(docs: dict[int, list[str]], sources: list[int]) -> Counter:
    return Counter((s, f"{document_key(text):016x}") for s in sources for text in docs[s])


def check_exactly_once(run, want: Counter) -> None:
    got = first_pass(run)
    duplicated = {k: n for k, n in got.items() if n > 1}
    missing, extra = want - got, got - want
    assert not duplicated and not missing and not extra, (
        f"{len(duplicated)} duplicated, {len(missing)} missing, {len(extra)} not of the sources")


@pytest.mark.parametrize(
    ("recipe", "before", "after"),
    [
        # shrunk: 2 processes x 2 workers -> 1 process, no workers (gradient accumulation 1 -> 2)
        ("quickstart_decoder", (2, 2, 1), (1, 0, 2)),
        # grown: 1 process, no workers -> 2 processes x 2 workers (gradient accumulation 2 -> 1)
        ("quickstart", (1, 0, 2), (2, 2, 1)),
    ],
    ids=["decoder-2x2-to-1x0", "microbert-1x0-to-2x2"],
)
def test_elastic_resume_trains_every_document_of_the_first_pass_once(tmp_path, mixture, bpe_500, wordpiece_800,
                                                                    capsys, caplog, recipe, before, after):
    root, docs = mixture
    tokenizer = bpe_500 if recipe == "quickstart_decoder" else wordpiece_800
    # A weighted mixture of two sources; the mixture's randomness continues over the layout change.
    sources = f"[{{path: json, data_files: '{root}/a-*.jsonl', weight: 2}}, " \
              f"{{path: json, data_files: '{root}/b-*.jsonl', weight: 1}}]"
    want = expected(docs, [0, 1])
    processes, workers, accumulation = before
    full = tmp_path / "full"
    run_to_end(args(recipe, sources, tokenizer, workers, accumulation, STEPS) + [f"runtime.output_dir={full}"],
               processes, capsys, caplog)
    check_exactly_once(full, want)  # the uninterrupted run reads the first pass whole too
    # The stop lands inside the first pass: documents of it are still to come after the checkpoint.
    before_stop = Counter((s, k) for path in (full / "trace").glob("rank-*.jsonl") for row in read_trace(path)
                          if row["step"] <= STOP for s, k, e in row["docs"] if e == 0)
    assert 0 < sum(before_stop.values()) < sum(want.values())

    run = tmp_path / "elastic"
    stopped_copy(full, run)
    processes, workers, accumulation = after
    out, err = run_to_end(args(recipe, sources, tokenizer, workers, before[2], STEPS) + [f"runtime.output_dir={run}"],
                          processes, capsys, caplog)
    assert f"resumed {before[0]}x{before[1]} -> {processes}x{workers}" in out, out[-2000:]
    assert f"data.gradient_accumulation_steps {before[2]} -> {accumulation}" in err
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    per_step = 2 * 32 * before[0] * before[2]  # the global batch is kept: tokens per optimizer step
    assert [b["tokens"] - a["tokens"] for a, b in zip(train, train[1:])] == [per_step] * (STEPS - 1)
    # The new layout wrote the steps after the stop: one trace file per new rank, each with its lines.
    for rank in range(processes):
        assert [r["step"] for r in read_trace(run / "trace" / f"rank-{rank}.jsonl") if r["step"] > STOP] == \
            list(range(STOP + 1, STEPS + 1))
    check_exactly_once(run, want)
    # ... and went on past the end of the first pass of every source.
    later = {s for path in (run / "trace").glob("rank-*.jsonl") for row in read_trace(path)
             if row["step"] > STOP for s, _, e in row["docs"] if e >= 1}
    assert later == {0, 1}
