"""Probes of the process's surroundings: how it was launched and which device it can use.

The entry points, the training loop, the stop signals and ``hf-streamlm eval`` all ask these
questions; the answers live here, below all of them, so none has to import another to ask.
"""

from __future__ import annotations

import os

import torch


def launched_by_accelerate() -> bool:
    """True in a process started by ``accelerate launch`` (torchrun sets LOCAL_RANK; the one-process
    launcher only its ACCELERATE_* variables)."""
    return "LOCAL_RANK" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ


def has_accelerator() -> bool:
    """True when a GPU-like device is present; without one Accelerate must be told ``cpu=True`` or
    processes started by ``accelerate launch``/torchrun each train alone instead of together."""
    probe = getattr(torch, "accelerator", None)
    return probe.is_available() if probe is not None else torch.cuda.is_available()


def default_device() -> torch.device:
    """The device a one-process job (``hf-streamlm eval``) runs on: the accelerator if any, else the CPU."""
    if not has_accelerator():
        return torch.device("cpu")
    probe = getattr(torch, "accelerator", None)
    return probe.current_accelerator() if probe is not None else torch.device("cuda")
