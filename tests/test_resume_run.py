"""Exact resume of a real training run killed with SIGKILL: the whole process group is killed at
random steps (and once while a checkpoint is being written), the same command is run again, and the
finished run logs the same per-step losses, eval losses and token counts as an uninterrupted run
(max |delta| = 0, CPU fp32), for MicroBERT and the decoder, with 0 and 2 DataLoader workers, and
with two processes under ``accelerate launch``; one case kills the resumed run a second time. Kill points
are drawn from a seeded generator (``KILL_SEED``, printed on failure) so a failure can be replayed; the
run kills itself as the drawn step's row reaches history.jsonl (tests/faults.py), so the kill lands at that
step however busy the machine is. The killed runs are processes of their own; the uninterrupted references
and the one-process resumes run ``main`` in the test process (conftest ``run_in_process``: the same run)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys

import pytest

from hf_streamlm.data.trace import read_trace
from tests.conftest import REPO, run_in_process, run_in_process_stdout

KILL_SEED = int(os.environ.get("KILL_SEED", "20261123"))
TOTAL_STEPS = 14


@pytest.fixture(scope="module")
def tokenizers(wordpiece_800, bpe_800) -> dict[str, str]:
    """Each recipe's kind of tokenizer, trained once for the session (exact resume does not depend on it)."""
    return {"quickstart": str(wordpiece_800), "quickstart_decoder": str(bpe_800)}


def common(recipe: str, shards, workers: int, tokenizers: dict[str, str]) -> list[str]:
    return [f"recipe={recipe}", f"data.sources=[{{path: json, data_files: '{shards}/part-*.jsonl'}}]",
            f"tokenizer.path={tokenizers[recipe]}", "model.hidden_size=32", "model.intermediate_size=64",
            "model.num_layers=2", "model.max_position_embeddings=64", "data.sequence_length=64",
            f"data.num_workers={workers}", "data.shuffle_buffer_size=300", "data.batch_size=8",
            f"scheduler.total_steps={TOTAL_STEPS}", "scheduler.warmup_steps=2", "runtime.log_every_n_steps=1",
            "runtime.checkpoint.every_n_steps=3", "runtime.checkpoint.max_keep=2", "runtime.evaluation.every_n_steps=5",
            "runtime.evaluation.max_batches=1", "runtime.logging.progress_bar=false", "runtime.demo_sentences=[]",
            "data.trace_documents=true"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(args: list[str], processes: int, module: list[str] | None = None) -> list[str]:
    """The run on ``processes`` processes; ``module``: what to run instead of ``-m hf_streamlm.run`` (a fault
    of tests/faults.py: ``["-m", "tests.faults", FAULT, STEP]``)."""
    module = module or ["-m", "hf_streamlm.run"]
    if processes == 1:
        return [sys.executable, *module, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *module, *args]


def launch(args: list[str], processes: int, kill_after: int | None = None) -> subprocess.CompletedProcess:
    """Run to the end in a session of its own, or, with ``kill_after``, SIGKILL the whole process group
    (launcher, ranks, DataLoader workers: what a preempted machine loses) as step ``kill_after``'s row
    reaches history.jsonl (tests/faults.py ``kill-after-row``)."""
    module = None if kill_after is None else ["-m", "tests.faults", "kill-after-row", str(kill_after)]
    proc = subprocess.Popen(command(args, processes, module), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    if kill_after is not None:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, err[-3000:])
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def history(run) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("tokens")) for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards, tokenizers):
    """The uninterrupted run of (recipe, workers, processes), made once for the tests that compare with it."""
    runs = {}

    def get(recipe: str, workers: int, processes: int):
        if (recipe, workers, processes) not in runs:
            full = tmp_path_factory.mktemp("full") / "run"
            args = common(recipe, shards, workers, tokenizers) + [f"runtime.output_dir={full}"]
            if processes == 1:
                run_in_process(*args)
            else:
                proc = launch(args, processes)
                assert proc.returncode == 0, proc.stderr[-3000:]
            assert len([r for r in history(full) if r[1] is not None]) == TOTAL_STEPS
            runs[recipe, workers, processes] = full
        return runs[recipe, workers, processes]

    return get


def resume(args: list[str], processes: int, capsys) -> str:
    """The same command again, to the end; returns its stdout. One process: ``main`` in this process."""
    if processes == 1:
        return run_in_process_stdout(capsys, *args)
    proc = launch(args, processes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize(
    ("recipe", "workers", "processes", "kills"),
    [("quickstart", 0, 1, 1), ("quickstart_decoder", 2, 1, 1), ("quickstart", 2, 1, 2),
     ("quickstart_decoder", 0, 2, 1)],
)
def test_sigkill_at_random_steps_then_resume_matches_uninterrupted_run(tmp_path, shards, tokenizers, uninterrupted,
                                                                      capsys, recipe, workers, processes, kills):
    """``kills`` kills in one run: with 2, the second kill lands in a run resumed from the first (5 kill points
    in all)."""
    args = common(recipe, shards, workers, tokenizers)
    full = uninterrupted(recipe, workers, processes)

    rng = random.Random(f"{KILL_SEED}-{recipe}-{workers}-{processes}")
    steps = sorted(rng.sample(range(2, TOTAL_STEPS - 1), kills))
    run = tmp_path / "killed"
    for step in steps:
        launch(args + [f"runtime.output_dir={run}"], processes, kill_after=step)
        assert max(r[0] for r in history(run)) == step  # the kill came before step `step`'s checkpoint
    out = resume(args + [f"runtime.output_dir={run}"], processes, capsys)
    if steps[-1] > 3:  # step 3's checkpoint was complete before step 4 was logged
        assert "Resuming from" in out, (steps, out[-2000:])
    assert history(run) == history(full), f"KILL_SEED={KILL_SEED} kills after steps {steps}"
    # The document trace survives the kills: one line per step, none lost or repeated, same documents.
    for rank in range(processes):
        killed, uninterrupted_trace = (read_trace(r / "trace" / f"rank-{rank}.jsonl") for r in (run, full))
        assert [row["step"] for row in killed] == list(range(1, TOTAL_STEPS + 1))
        assert killed == uninterrupted_trace and sum(len(row["docs"]) for row in killed) > TOTAL_STEPS


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_complete_one(tmp_path, shards, tokenizers,
                                                                                 uninterrupted, capsys, caplog):
    """The process group (run and its 2 DataLoader workers) is SIGKILLed while step 6's checkpoint is being
    written (tests/faults.py: after the rank's files are in ``.tmp-step-6``, before the rename)."""
    args = common("quickstart_decoder", shards, 2, tokenizers)
    run = tmp_path / "killed"
    ckpts = run / "checkpoints"
    fault = [sys.executable, "-m", "tests.faults", "kill-in-checkpoint", "6", *args, f"runtime.output_dir={run}"]
    proc = subprocess.run(fault, cwd=REPO, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (ckpts / ".tmp-step-6").is_dir() and not (ckpts / "step-6").exists()
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-3"]
    out = resume(args + [f"runtime.output_dir={run}"], 1, capsys)
    assert "Resuming from" in out and "step-3 (step 3)" in out
    assert "incomplete checkpoint" in caplog.text
    assert not list(ckpts.glob(".tmp-*"))
    assert history(run) == history(uninterrupted("quickstart_decoder", 2, 1))
