"""Faults at the recipe's shape, on a real 2-process ``accelerate launch``: 2 DataLoader workers per rank,
gradient accumulation 4, micro-batch 2, document masking, a stream served by the loopback Hub.

- A 429 that reaches **one rank only** (the usual case on the Hub: one worker's shard is rate-limited): every
  rank saves the last completed step and exits 4 within seconds, with one line naming the rank and the source,
  and the run resumes exactly once the source answers again. (Before: the failing rank skipped the gather of
  the messages and went on to the checkpoint's barrier while the other rank waited in the gather, both until
  the process group's timeout.)
- A failure in the **middle of gradient accumulation**: the micro-batches fetched for the step that failed are
  not lost, the resumed run trains them (the checkpoint's data state is the step boundary's).
- A **group SIGTERM mid-accumulation with ``log_every_n_steps=50``**: the stop travels in the step's one
  read-back (``NonFiniteGuard.decide``) and is adopted without a logging step; checkpoint, exit 0, exact resume.

One uninterrupted reference (module fixture) serves each comparison: losses logged every step, the document
trace per rank, and the exported weights.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.faults import Drained, release, wait_until_held
from tests.hub_server import HubServer
from tests.test_resume_run import command

STEPS = 14
PER_SHARD = 600
SHARDS = [f"data/train-{i:05d}-of-00004.jsonl" for i in range(4)]


def documents(shard: int) -> list[dict]:
    """Short distinct documents (~25 tokens): a worker uses up a chunk of the 256 it reads ahead in ~6 steps,
    so a fault placed at step 3 is met by step ~7 (a shard's second pass opens it again)."""
    start = shard * PER_SHARD
    return [{"text": f"doc{i:05d} " + " ".join(f"w{(i * 7 + k) % 50}" for k in range(5 + i % 7)) + "."}
            for i in range(start, start + PER_SHARD)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A loopback Hub serving ``org/web`` (4 jsonl shards), and the environment that points a run at it."""
    root = tmp_path_factory.mktemp("rank-faults")
    server = HubServer(root / "hub").start()
    for i, shard in enumerate(SHARDS):
        server.add_file(f"datasets/org/web/{shard}", "".join(json.dumps(d) + "\n" for d in documents(i)))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=server.url, HF_TOKEN="hf_local_test_token", HF_HOME=str(root / "hf_home"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_UPDATE_DOWNLOAD_COUNTS="0")
    server.env = env
    yield server
    server.stop()


def args(tokenizer: Path, out: Path, *extra: str) -> list[str]:
    """runpod_1b's shape, scaled down: 2 workers, accumulation 4, micro-batch 2, document masking, a trace."""
    return ["recipe=quickstart_decoder", "data.sources=[{path: org/web}]", f"tokenizer.path={tokenizer}",
            "data.num_workers=2", "data.gradient_accumulation_steps=4", "data.batch_size=2",
            "data.sequence_length=256", "data.document_masking=true", "data.shuffle_buffer_size=64",
            "data.eval_holdout=0", "data.retries=1", "data.retry_backoff=0", "data.trace_documents=true",
            "model.num_layers=1", "model.hidden_size=64", "model.intermediate_size=128",
            "model.num_attention_heads=2", "model.num_key_value_heads=1", "scheduler.strategy=constant",
            "scheduler.warmup_steps=0", f"scheduler.total_steps={STEPS}", "runtime.log_every_n_steps=1",
            "runtime.checkpoint.every_n_steps=4", "runtime.checkpoint.max_keep=10",
            "runtime.evaluation.every_n_steps=null", "runtime.logging.progress_bar=false",
            "runtime.logging.tensorboard=false", "runtime.demo_sentences=[]", f"runtime.output_dir={out}", *extra]


def start(hub: HubServer, run_args: list[str], fault: list[str] | None = None, rank: int = 0) -> Drained:
    """Two processes in a session of their own (a pod's process group); ``fault``: a tests/faults.py hold."""
    module = ["-m", "tests.faults", *fault] if fault else None
    return Drained(command(run_args, 2, module), cwd=REPO, start_new_session=True,
                   env={**hub.env, "TESTS_FAULTS_RANK": str(rank)})


def finish(proc: Drained, timeout: int = 240) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s (a rank left waiting in a collective?): "
                             f"{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def trace(run: Path) -> dict[int, list]:
    """Every rank's trace: (rank, step) -> documents, one line per step and rank, in file order."""
    rows = {}
    for rank in (0, 1):
        lines = (run / "trace" / f"rank-{rank}.jsonl").read_text().splitlines()
        steps = [json.loads(line)["step"] for line in lines]
        assert steps == list(range(1, len(steps) + 1)), f"rank {rank}: steps {steps}"  # none lost or repeated
        rows.update({(rank, json.loads(line)["step"]): json.loads(line)["docs"] for line in lines})
    return rows


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "export" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(hub, tmp_path_factory, bpe_500) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    result = finish(start(hub, args(bpe_500, out)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(losses(out)) == STEPS
    return out


def test_a_429_on_one_ranks_shard_stops_every_rank_with_exit_4_and_resumes_exactly(hub, tmp_path, bpe_500, reference):
    """Rank 0 holds after step 3 while its first worker's shard starts answering 429 for good; it meets the
    fault at that worker's next read-ahead, mid-step. Both ranks save step N (the last completed), exit 4 within
    seconds of the failure, and say which rank and source failed; with the shard back, the resume logs the
    reference's losses and traces the reference's documents, step by step on both ranks."""
    out = tmp_path / "run"
    proc = start(hub, args(bpe_500, out), ["hold-after-step", "3"])
    wait_until_held(proc, out, 3)
    bad = SHARDS[0]  # rank 0's first worker (datasets splits files over ranks, then workers, round-robin)
    hub.fail_with(bad, 429, times=None, repo="org/web")
    released = time.monotonic()
    release(out, 3)
    try:
        result = finish(proc)
    finally:
        hub.clear_faults()
    elapsed = time.monotonic() - released
    assert "exitcode  : 4" in result.stderr, result.stderr[-3000:]  # the ranks' status; torchrun exits 1
    messages = {line for line in result.stderr.splitlines() if line.startswith("hf-streamlm: error:")}
    (message,) = messages  # both ranks say the same line
    step = max(losses(out))
    assert message.startswith("hf-streamlm: error: rank 0: ") and "org/web" in message and "429" in message, message
    assert f"training stopped after step {step}" in message and 3 < step < STEPS
    newest = max((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    assert newest.name == f"step-{step}"
    assert sorted(p.name for p in newest.glob("data_state_*.pt")) == ["data_state_0.pt", "data_state_1.pt"]
    print(f"one-rank 429: stopped after step {step}, both ranks out {elapsed:.1f} s after the release")
    assert elapsed < 90  # the retries (~5 s) and a save; never the process group's timeout (30 min)

    resumed = finish(start(hub, args(bpe_500, out)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step-{step} (step {step})" in resumed.stdout
    assert losses(out) == losses(reference)
    assert trace(out) == trace(reference)


def test_group_sigterm_mid_accumulation_logging_every_50_steps_saves_exits_0_and_resumes_exactly(hub, tmp_path,
                                                                                                bpe_500, reference):
    """Rank 1 holds after step 6's second micro-batch; the test sends SIGTERM to the process group. With
    ``log_every_n_steps=50`` no logging step agrees on the stop: it travels in the step's one read-back and
    is adopted. Both ranks finish step 6, save it and exit 0; the resumed run ends with the reference's
    weights, bit for bit, and trains the reference's documents at every step on both ranks."""
    out = tmp_path / "run"
    run_args = args(bpe_500, out, "runtime.log_every_n_steps=50")
    proc = start(hub, run_args, ["hold-in-step", "6"], rank=1)
    wait_until_held(proc, out, 6, "in")
    os.killpg(proc.pid, signal.SIGTERM)
    result = finish(proc)
    match = re.search(r"Stopped by SIGTERM at step (\d+); checkpoint saved", result.stdout)
    assert match and int(match.group(1)) == 6, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "killed by signal" not in result.stderr and "exitcode  : 4" not in result.stderr
    assert sorted(p.name for p in (out / "checkpoints" / "step-6").glob("data_state_*.pt")) == [
        "data_state_0.pt", "data_state_1.pt"]

    resumed = finish(start(hub, run_args))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-6 (step 6)" in resumed.stdout
    expected, got = weights(reference), weights(out)
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)
    assert trace(out) == trace(reference)


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
