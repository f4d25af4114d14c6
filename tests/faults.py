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

The hooks wrap ``checkpoint.sync_tree`` (the first call after ``accelerator.save_state`` in
``save_checkpoint``) and ``History.write``; nothing else of the run is changed.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

FAULTS = ("kill-in-checkpoint", "sigterm-in-checkpoint", "sigterm-after-row")


def install(fault: str, step: int) -> None:
    from hf_streamlm.train import checkpoint, history

    if fault not in FAULTS:
        raise SystemExit(f"tests.faults: unknown fault {fault!r}; choose one of {', '.join(FAULTS)}")
    fired = False

    def fire() -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        if fault == "kill-in-checkpoint":
            if os.getpgid(0) == os.getpid():  # started in a session of its own: the group is this run's
                os.killpg(0, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGTERM)

    if fault.endswith("-in-checkpoint"):
        sync_tree = checkpoint.sync_tree

        def sync_tree_then_fire(root: Path) -> None:
            sync_tree(root)
            if Path(root).name == f".tmp-step-{step}":
                fire()

        checkpoint.sync_tree = sync_tree_then_fire
    else:
        write = history.History.write

        def write_then_fire(self, row) -> None:
            write(self, row)
            if row.get("step") == step and "loss" in row:
                fire()

        history.History.write = write_then_fire


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    from hf_streamlm.run import main

    sys.exit(main(sys.argv[3:]))
