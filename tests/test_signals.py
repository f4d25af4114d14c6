"""SIGTERM (how RunPod stops a pod) and SIGINT: the run saves a checkpoint at the next step boundary
and exits 0; running the same command again resumes and ends exactly like an uninterrupted run.

A test that sends a signal itself does so while the run waits for it after a chosen step (tests/faults.py
``hold-after-step``): the run stops at exactly that step, however busy the machine. The uninterrupted
reference and the resumes to the end run ``main`` in the test process (conftest ``run_in_process``)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_in_process, run_in_process_stdout, checkpoints_of
from tests.faults import Drained, wait_until_held

TOTAL_STEPS = 40
ARGS = ["recipe=quickstart_decoder", f"scheduler.total_steps={TOTAL_STEPS}", "scheduler.warmup_steps=2",
        "runtime.log_every_n_steps=1", "runtime.checkpoint.every_n_steps=1000", "runtime.evaluation.every_n_steps=null",
        "runtime.logging.progress_bar=false", "runtime.demo_sentences=[]", "data.batch_size=4",
        "data.sequence_length=64", "model.num_layers=1", "data.trace_documents=true"]


@pytest.fixture(scope="module")
def args(bpe_800) -> list[str]:
    return [*ARGS, f"tokenizer.path={bpe_800}"]


@pytest.fixture(scope="module")
def full(tmp_path_factory, args) -> Path:
    """The uninterrupted run the resumed ones must equal (checkpoint writes do not change what is trained)."""
    out = tmp_path_factory.mktemp("full") / "run"
    run_in_process(*args, f"runtime.output_dir={out}")
    return out


def with_fault(fault: str, step: int, args: list[str]) -> subprocess.CompletedProcess:
    """The run, signalling itself at ``fault`` of ``step`` (tests/faults.py): no race with a poll."""
    return subprocess.run([sys.executable, "-m", "tests.faults", fault, str(step), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def held(args: list[str], run: Path, step: int, launcher: list[str] | None = None, env: dict | None = None) -> Drained:
    """The run (under ``launcher``, an ``accelerate launch`` command, if given), started and waiting after
    ``step`` for a stop signal (tests/faults.py ``hold-after-step``)."""
    import os

    cmd = [*(launcher or [sys.executable]), "-m", "tests.faults", "hold-after-step", str(step), *args,
           f"runtime.output_dir={run}"]
    proc = Drained(cmd, cwd=REPO, env={**os.environ, **(env or {})})
    wait_until_held(proc, run, step)
    return proc


def losses(run) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def checkpoint_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["step"]


def stop_at(args: list[str], run: Path, step: int, sig: signal.Signals) -> str:
    """Start the run, send ``sig`` to it while it holds after ``step``; it must save at that step's boundary,
    exit 0 and not export. Returns its stdout."""
    proc = held(args, run, step)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert f"Stopped by {sig.name} at step {step};" in out, out[-2000:]
    newest = max(checkpoints_of(run), key=lambda p: int(p.name.split("-")[1]))
    assert newest.name == f"step-{step}" and checkpoint_step(newest) == step
    assert not (run / "export").exists()  # preempted, not finished
    return out


def test_sigterm_then_sigint_save_at_step_boundary_exit_0_and_resume_is_exact(tmp_path, args, full, capsys):
    """SIGTERM stops the run at step 10; the same command resumes and SIGINT stops it at step 20; the same
    command again ends as the uninterrupted run. One chain instead of a run per signal: the resume between
    the stops is itself stopped."""
    run = tmp_path / "run"
    stop_at(args, run, 10, signal.SIGTERM)
    assert [p.name for p in checkpoints_of(run)] == ["step-10"]  # the one checkpoint: the stop's
    out = stop_at(args, run, 20, signal.SIGINT)
    assert "step-10 (step 10)" in out  # it resumed from the first stop
    out = run_in_process_stdout(capsys, *args, f"runtime.output_dir={run}")
    assert "step-20 (step 20)" in out
    assert losses(run) == losses(full)  # max |delta| = 0 over all steps


def test_sigterm_during_a_checkpoint_write_finishes_it_and_stops_at_the_next_boundary(tmp_path, args, full, capsys):
    """The signal lands while step 30's checkpoint is being written (tests/faults.py: its files are in
    ``.tmp-step-30``, not yet renamed): that write completes, the run stops after step 31 with a checkpoint
    there, exits 0, and resumes exactly."""
    run = tmp_path / "run"
    args = [*args, "runtime.checkpoint.every_n_steps=30", "runtime.checkpoint.max_keep=5"]
    proc = with_fault("sigterm-in-checkpoint", 30, [*args, f"runtime.output_dir={run}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Stopped by SIGTERM at step 31" in proc.stdout, proc.stdout[-2000:]  # never step 30's write cut short
    assert sorted(p.name for p in checkpoints_of(run)) == ["step-30", "step-31"]
    out = run_in_process_stdout(capsys, *args, f"runtime.output_dir={run}")
    assert "step-31 (step 31)" in out
    assert losses(run) == losses(full)


def test_sigterm_to_a_one_process_accelerate_launch_reaches_the_run(tmp_path, args):
    """`accelerate launch` with one process does not forward SIGTERM (it dies); the training process
    follows its launcher (PR_SET_PDEATHSIG), saves at the next step boundary and exits 0."""
    run = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher = held(args, run, 10, launch)  # the training process waits after step 10
    launcher.send_signal(signal.SIGTERM)  # to the launcher only
    out, err = launcher.communicate(timeout=300)  # the pipes close when the training process has exited
    assert "Stopped by SIGTERM at step 10;" in out, err[-2000:]
    (checkpoint,) = checkpoints_of(run)
    assert checkpoint_step(checkpoint) == 10


def test_sigterm_during_eval_finishes_it_and_stops_at_that_step(tmp_path, args):
    """The signal lands as step 20's train row is written, before its evaluation (tests/faults.py): the
    evaluation runs to the end, the run checkpoints at step 20 and exits 0."""
    run = tmp_path / "run"
    args = [*args, "runtime.evaluation.every_n_steps=20", "runtime.evaluation.max_batches=100", "data.eval_holdout=0.5"]
    proc = with_fault("sigterm-after-row", 20, [*args, f"runtime.output_dir={run}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 20 and "eval_loss" in rows[-1]  # the evaluation was not cut short
    assert rows[-1]["eval_loss"] > 0 and len([r for r in rows if "loss" in r]) == 20
    assert "Stopped by SIGTERM at step 20" in proc.stdout
    assert [p.name for p in checkpoints_of(run)] == ["step-20"]


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path, args):
    """Two processes; only rank 1 gets SIGTERM, while it waits after step 10 (rank 0 waits for it in the
    step's stop check). The ranks agree at that step's boundary: one checkpoint holding both ranks' data
    states, both exit 0, and the launcher with them."""
    import psutil

    from tests.test_resume_run import free_port

    run = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(free_port())]
    launcher = held(args, run, 10, launch, env={"TESTS_FAULTS_RANK": "1"})
    ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
             if "tests.faults" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
    assert len(ranks) == 1
    ranks[0].send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-2000:]
    (checkpoint,) = checkpoints_of(run)
    assert sorted(p.name for p in checkpoint.glob("data_state_*.pt")) == ["data_state_0.pt", "data_state_1.pt"]
    assert checkpoint_step(checkpoint) == 10 and "Stopped by SIGTERM at step 10;" in out
