"""A read failure in the middle of gradient accumulation: the micro-batches fetched for the step that failed
are not lost; the checkpoint saved on the way out holds the data state of the step's start
(``ResumableLoader.mark``/``rewind``), so the resumed run trains them.

The same at the recipe's shape on 2 processes (a 429 on one rank's shards, a group SIGTERM mid-accumulation
with ``log_every_n_steps=50``) is a leg of the rehearsal (benchmarks/rehearse.py, tests/test_rehearsal.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.faults import release


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_read_failure_mid_accumulation_resumes_with_the_micro_batches_fetched_before_it(tmp_path, shards, bpe_500,
                                                                                        capsys, caplog):
    """One process, no DataLoader worker (the pipeline in the training process), accumulation 6 of 8 x 128 tokens: the
    source's files are made unreadable while the run holds after step 2; the next file is opened (and fails)
    after 2 of step 14's 6 micro-batches were fetched. The checkpoint saved on the way out holds the data state
    of the step's start, so the resumed run trains those micro-batches: its losses and trace equal the
    uninterrupted run's. (Before: the state after the fetched micro-batches was saved, and the resume started
    after them.)"""
    import shutil

    from tests.conftest import run_in_process
    from tests.test_preemption import errors, finish as finish_one, held

    source = tmp_path / "source"
    shutil.copytree(shards, source)
    originals = {p: p.read_bytes() for p in source.glob("part-*.jsonl")}
    run_args = ["recipe=quickstart_decoder", f"data.sources=[{{path: json, data_files: '{source}/part-*.jsonl'}}]",
                f"tokenizer.path={bpe_500}", "data.num_workers=0", "data.gradient_accumulation_steps=6",
                "data.batch_size=8", "data.sequence_length=128", "data.shuffle_buffer_size=0", "data.eval_holdout=0",
                "data.trace_documents=true", "model.num_layers=1", "model.hidden_size=64",
                "model.intermediate_size=128", "scheduler.strategy=constant", "scheduler.warmup_steps=0",
                "runtime.log_every_n_steps=1", "runtime.checkpoint.every_n_steps=100",
                "runtime.evaluation.every_n_steps=null", "runtime.logging.progress_bar=false",
                "runtime.demo_sentences=[]"]
    reference = tmp_path / "reference"
    run_in_process(*run_args, "scheduler.total_steps=16", f"runtime.output_dir={reference}")

    out = tmp_path / "run"
    proc = held([*run_args, "scheduler.total_steps=16"], out, 1, 2)
    for path in originals:
        path.write_text('{"text": "a document cut short\\n')
    release(out, 2)
    result = finish_one(proc)
    assert result.returncode == 4, result.stderr[-3000:]
    fetched = re.search(r"data failure after (\d+) of the step's 6 micro-batches were fetched", result.stderr)
    assert fetched and 0 < int(fetched.group(1)) < 6, result.stderr[-3000:]  # in the middle of the accumulation
    step = max(losses(out))
    assert f"training stopped after step {step}" in errors(result)[0]
    for path, data in originals.items():
        path.write_bytes(data)
    run_in_process(*run_args, "scheduler.total_steps=16", f"runtime.output_dir={out}")
    assert losses(out) == losses(reference)
    assert (out / "trace" / "rank-0.jsonl").read_text() == (reference / "trace" / "rank-0.jsonl").read_text()
