"""Stop signals the way launchers send them.

torchrun's agent, SLURM (``scancel``, a time limit), ``docker stop`` and a Kubernetes pod shutdown send
SIGTERM to a whole process group, not to the training process alone: DataLoader workers get it too.
A worker killed by it makes the training process fail (``DataLoader worker (pid ...) is killed by
signal: Terminated``) before it can save. So the training process owns the stop: workers are started
with SIGTERM and SIGINT blocked (:func:`shielded`), and the main process finishes the step, saves and
exits 0 (:class:`StopSignal`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator

import torch
from accelerate import Accelerator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """Remembers SIGTERM/SIGINT instead of dying mid-step; the loop checks it at step boundaries, so a
    signal during eval or a checkpoint write is honoured at the next boundary."""

    def __init__(self):
        self.received: int | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal (for the stop log)
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            follow_launcher()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received, self.received_at = signum, time.monotonic()

    def elapsed(self) -> float:
        """Seconds since the signal arrived (on this rank; when another rank got it, since the ranks agreed)."""
        return time.monotonic() - self.received_at if self.received_at is not None else 0.0

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every rank as soon as any rank got a signal (ranks must stop at the same step). The
        training loop learns the same from :meth:`NonFiniteGuard.decide`, in the step's one read-back."""
        flag = torch.tensor([1 if self.received else 0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return self.adopt(bool(flag.item()))

    def adopt(self, agreed: bool) -> bool:
        """Take the ranks' common decision ``agreed`` (any rank got a signal) as this rank's; returns it."""
        if agreed and not self.received:
            self.received, self.received_at = signal.SIGTERM, time.monotonic()  # another rank's signal
        return agreed

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def follow_launcher() -> None:
    """Under ``accelerate launch``, get SIGTERM when the launcher dies (Linux ``PR_SET_PDEATHSIG``). A
    one-process launch does not forward the SIGTERM a pod stop sends it: the launcher just dies, and
    without this the run would go on orphaned, then be killed with nothing saved."""
    from hf_streamlm.run import launched_by_accelerate

    if not launched_by_accelerate() or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@contextlib.contextmanager
def blocked(signals=STOP_SIGNALS) -> Iterator[None]:
    """Block ``signals`` in this thread for the duration; one that arrives meanwhile is delivered (to
    :class:`StopSignal`) when they are unblocked. Processes forked meanwhile keep them blocked: the
    signal mask survives ``fork`` and ``exec``, and torch's worker start-up does not change it."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no process groups to protect from either
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def shielded(batches: Iterator) -> Iterator:
    """``batches`` with its DataLoader workers deaf to SIGTERM/SIGINT sent to the process group.

    The workers are forked when the first batch is asked for, so that request runs with the stop
    signals blocked. Blocking (rather than ``SIG_IGN`` in a ``worker_init_fn``) leaves no window: torch
    installs its own SIGTERM handler in each worker before any init function runs. A blocked worker
    still ends the normal ways: the loader's shutdown message, its parent's death (torch's watchdog),
    or SIGKILL at the end of the launcher's grace period."""
    with blocked():
        first = next(batches, None)
    if first is None:
        return
    yield first
    yield from batches
