"""``python -m tests.faults FAULT STEP recipe=... key=value ...``: a real training run (``hf_streamlm.run``)
that sends itself a signal at a chosen point, instead of a test polling the run directory and hoping its
signal lands in time (a checkpoint write lasts a few milliseconds: a 1 ms poll missed it on a busy machine).
The signal is real and goes through the OS; only the moment is chosen:

- ``kill-in-checkpoint N``: SIGKILL to the process group (the run and its DataLoader workers, what a
  preempted machine loses) while step N's checkpoint is being written: its rank files are written into
  ``.tmp-step-N``, the folder is not renamed yet.
- ``sigterm-in-checkpoint N``: SIGTERM to the run at that same point (the handler only records it).
- ``sigterm-after-row N``: SIGTERM to the run as step N's train row reaches history.jsonl, before that
  step's evaluation and checkpoint.
- ``kill-after-row N``: SIGKILL to the process group at that same point: a preemption at a step chosen by the
  test, which no poll of history.jsonl can overshoot into the end of the run.
- ``hold-after-step N``: as step N's line reaches the document trace (``data.trace_documents=true``), before
  that step's row, evaluation and stop check, the run writes ``held-after-step-N`` into its output folder and
  waits until a stop signal has reached it (from the test, or from the launcher's death), then stops at that
  step's boundary; or until the test writes ``release-after-step-N`` there (after changing what the run
  reads, say), then goes on. The test acts once the first file is there: the run cannot have gone on
  meanwhile. Under ``accelerate launch`` the rank named by ``TESTS_FAULTS_RANK`` (default 0) holds.
- ``record-batches N``: no fault; every micro-batch's ``input_ids`` and ``position_ids`` as the loop moves them to
  the device (``N`` unused), saved at exit to ``batches-rank<r>.npz`` in the run folder (benchmarks/rehearse.py
  compares the blocks handed over at a layout change with the uninterrupted run's).
- ``hold-in-step N``: the same hold, in the middle of step N's gradient accumulation (N >= 2,
  ``data.gradient_accumulation_steps`` >= 3, ``data.trace_documents=true``): after the backward pass of the
  step's second micro-batch, with ``held-in-step-N`` as the marker and ``release-in-step-N`` to go on.

A kill reaches beyond the run's own process only where the test made the processes a group of their own
(:func:`kill_everything`). The row hooks fire on the process that writes history.jsonl (rank 0). They wrap
``checkpoint.sync_tree`` (the first call after ``accelerator.save_state`` in ``save_checkpoint``),
``History.write``, ``DocumentTrace.write``, ``NonFiniteGuard.add_loss`` and ``StopSignal._handle``; nothing else of
the run is changed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

FAULTS = ("kill-in-checkpoint", "sigterm-in-checkpoint", "sigterm-after-row", "kill-after-row", "hold-after-step",
          "hold-in-step", "record-batches")
HOLD_TIMEOUT = 300  # seconds a held run waits for its signal before it fails


def kill_everything() -> None:
    """SIGKILL to the run's processes: its process group when it leads one (it was started in a session of its
    own: it, and its DataLoader workers); under an ``accelerate launch`` that leads its own group, the launcher
    and everything it started too (torchrun starts each rank in a session of its own, so the launcher's group
    does not hold the ranks)."""
    import psutil

    from hf_streamlm.env import launched_by_accelerate

    parent = os.getppid()
    if launched_by_accelerate() and os.getpgid(parent) == parent:
        launcher = psutil.Process(parent)
        for process in [launcher, *launcher.children(recursive=True)]:
            if process.pid != os.getpid():
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
    if os.getpgid(0) == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str, step: int) -> None:
    import threading

    from hf_streamlm.data import trace
    from hf_streamlm.train import checkpoint, history, signals

    if fault not in FAULTS:
        raise SystemExit(f"tests.faults: unknown fault {fault!r}; choose one of {', '.join(FAULTS)}")
    fired = False

    def fire() -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        if fault.startswith("kill-"):
            kill_everything()
        os.kill(os.getpid(), signal.SIGTERM)

    if fault.endswith("-in-checkpoint"):
        sync_tree = checkpoint.sync_tree

        def sync_tree_then_fire(root: Path) -> None:
            sync_tree(root)
            if Path(root).name == f".tmp-step-{step}":
                fire()

        checkpoint.sync_tree = sync_tree_then_fire
    elif fault.endswith("-after-row"):
        write = history.History.write

        def write_then_fire(self, row) -> None:
            write(self, row)
            if row.get("step") == step and "loss" in row:
                fire()

        history.History.write = write_then_fire
    elif fault == "record-batches":
        record_batches()
    elif os.environ.get("RANK", "0") == os.environ.get("TESTS_FAULTS_RANK", "0"):  # hold-after-step, hold-in-step
        signalled = threading.Event()  # a stop signal reached the run's handler
        handle = signals.StopSignal._handle

        def handle_and_note(self, signum, frame) -> None:
            handle(self, signum, frame)
            signalled.set()

        signals.StopSignal._handle = handle_and_note

        def hold(out: Path, where: str) -> None:
            (out / f"held-{where}-step-{step}").touch()
            # Short waits: Python runs a signal's handler in the main thread between bytecodes, and a signal
            # that the kernel hands to another thread does not interrupt this thread's wait.
            deadline = time.monotonic() + HOLD_TIMEOUT
            while not signalled.wait(0.05) and not (out / f"release-{where}-step-{step}").exists():
                if time.monotonic() > deadline:
                    raise SystemExit(f"tests.faults: no stop signal or release within {HOLD_TIMEOUT} s of step {step}")

        write_trace = trace.DocumentTrace.write
        seen = {"out": None, "micro": None}  # the run folder; micro-batches of step `step` so far

        def write_then_hold(self, at: int, docs: list[list]) -> None:
            write_trace(self, at, docs)
            seen["out"] = self.path.parent.parent
            if fault == "hold-after-step" and at == step:
                hold(seen["out"], "after")
            elif at == step - 1:
                seen["micro"] = 0

        trace.DocumentTrace.write = write_then_hold
        if fault == "hold-in-step":
            from hf_streamlm.train import monitor

            add_loss = monitor.NonFiniteGuard.add_loss

            def add_loss_then_hold(self, loss) -> None:
                add_loss(self, loss)
                if seen["micro"] is not None:
                    seen["micro"] += 1
                    if seen["micro"] == 2:
                        hold(seen["out"], "in")

            monitor.NonFiniteGuard.add_loss = add_loss_then_hold


def record_batches() -> None:
    """Keep each micro-batch's ``input_ids`` and ``position_ids`` (as the loop hands them to ``to_device``); write
    them to ``batches-rank<r>.npz`` in the run folder when the process exits."""
    import atexit

    import numpy as np

    from hf_streamlm.train import loop

    to_device, kept = loop.to_device, {"input_ids": [], "position_ids": []}

    def record_then_move(batch, device):
        for name, rows in kept.items():
            rows.append(batch[name].numpy().copy())
        return to_device(batch, device)

    def save() -> None:
        out = Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("runtime.output_dir=")))
        if kept["input_ids"]:
            np.savez(out / f"batches-rank{os.environ.get('RANK', '0')}.npz",
                     **{name: np.stack(rows) for name, rows in kept.items()})

    loop.to_device = record_then_move
    atexit.register(save)


class Drained(subprocess.Popen):
    """A run whose stdout and stderr (text pipes) are read from the start, by a thread each, while the test
    waits for it to hold: a chatty run can never block on a full pipe before it reaches the hold.
    ``communicate`` returns what the threads read, once the pipes close (every process holding them ended)."""

    def __init__(self, cmd: list[str], **kwargs) -> None:
        super().__init__(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
        self.read = {"stdout": [], "stderr": []}
        self.readers = [threading.Thread(target=self._drain, args=(pipe, self.read[name]), daemon=True)
                        for name, pipe in (("stdout", self.stdout), ("stderr", self.stderr))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _drain(pipe, chunks: list[str]) -> None:
        chunks.extend(pipe)  # line by line, until every process holding the pipe has ended

    def communicate(self, input=None, timeout: float | None = None) -> tuple[str, str]:
        deadline = None if timeout is None else time.monotonic() + timeout
        self.wait(timeout)
        for reader in self.readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        return "".join(self.read["stdout"]), "".join(self.read["stderr"])


def wait_until_held(proc: Drained, out: Path, step: int, where: str = "after") -> None:
    """Return once the run started as ``proc`` with ``hold-after-step step`` (``where="in"``: ``hold-in-step``)
    holds there (its marker is in ``out``); fail if it ends first. No deadline to race: the run waits there until
    signalled or released."""
    marker = out / f"held-{where}-step-{step}"
    while not marker.exists():
        if proc.poll() is not None:
            _, err = proc.communicate(timeout=60)
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}: {err[-3000:]}")
        time.sleep(0.05)


def release(out: Path, step: int, where: str = "after") -> None:
    """Let a run held after (``where="in"``: in) ``step`` go on."""
    (out / f"release-{where}-step-{step}").touch()


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    from hf_streamlm.run import main

    sys.exit(main(sys.argv[3:]))
