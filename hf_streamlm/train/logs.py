"""One logged row of the run: assembled from the ranks, then written to ``history.jsonl``, stdout (above
the progress bar) and the trackers (``runtime.logging.report_to``)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator

from hf_streamlm.data.quality import SKIP_KINDS
from hf_streamlm.train.history import History


class Window:
    """The steps since the last logged row: summed loss and z-loss term (on the device: no read-back per step),
    micro-batches, tokens, and the time spent waiting for data."""

    def __init__(self):
        self.loss: torch.Tensor | float = 0.0
        self.z_loss: torch.Tensor | None = None
        self.micro = self.tokens = 0
        self.wait, self.t0 = 0.0, time.perf_counter()

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.wait += time.perf_counter() - start

    def add(self, loss: torch.Tensor, tokens: int, z_loss: torch.Tensor | None = None) -> None:
        """``z_loss``: the z-loss term included in ``loss`` (the decoder's output field), kept apart so that the
        row's ``loss`` is the cross entropy, comparable with ``eval_loss``."""
        self.loss = self.loss + loss.detach().float()
        if z_loss is not None:
            self.z_loss = (0.0 if self.z_loss is None else self.z_loss) + z_loss.detach().float()
        self.micro += 1
        self.tokens += tokens

    def row(self, state: dict[str, Any], lr: float, grad_norm, accelerator: Accelerator) -> dict[str, Any]:
        """The history row of the window (loss averaged over ranks, tokens summed; ``state["tokens"]`` moves on),
        then a fresh window."""
        z_loss = float(self.z_loss) / self.micro if self.z_loss is not None else 0.0
        stats = torch.tensor([float(self.loss) / self.micro - z_loss, self.tokens, z_loss], device=accelerator.device)
        stats = accelerator.reduce(stats, reduction="sum")
        elapsed = time.perf_counter() - self.t0
        state["tokens"] += int(stats[1])
        row = {
            "step": state["step"],
            "epoch": state["epoch"],
            "loss": float(stats[0]) / accelerator.num_processes,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens": state["tokens"],
            "tokens_per_s": float(stats[1]) / elapsed,
            "data_wait_pct": 100.0 * self.wait / elapsed,
            "nonfinite_skips": state["nonfinite_skips"],
            "spike_skips": state.get("spike_skips", 0),
        }
        if self.z_loss is not None:
            row["z_loss"] = float(stats[2]) / accelerator.num_processes
        self.__init__()
        return row


def source_counts(loader, names: list[str], accelerator: Accelerator) -> dict[str, dict[str, int]]:
    """Documents and tokens read so far from each source, and documents skipped by kind (empty,
    null, not text, too short), summed over ranks."""
    docs, tokens = loader.source_counts()
    local = torch.tensor([docs.get(i, 0) for i in range(len(names))] + [tokens.get(i, 0) for i in range(len(names))],
                         dtype=torch.long, device=accelerator.device)
    skipped = loader.skip_counts()
    local = torch.cat([local, torch.tensor([skipped.get(k, 0) for k in SKIP_KINDS], device=accelerator.device)])
    mixture = loader.mixture()  # sources mixed along data.schedule: the stage, and tokens per stage and source
    if mixture is not None:
        stage, counts, stages = mixture
        local = torch.cat([local, torch.tensor([counts.get(k, {}).get(i, 0) for k in range(stages)
                                                for i in range(len(names))] + [stage], device=accelerator.device)])
    total = accelerator.reduce(local, reduction="sum").tolist()
    n = len(names)
    row = {
        "source_docs": dict(zip(names, total[:n])),
        "source_tokens": dict(zip(names, total[n : 2 * n])),
        "skipped": {k: v for k, v in zip(SKIP_KINDS, total[2 * n : 2 * n + len(SKIP_KINDS)]) if v},
    }
    if mixture is not None:
        flat = total[2 * n + len(SKIP_KINDS):]
        # The realized mixture: tokens trained per stage and source (the model card's table), and the stage now.
        row["stage_tokens"] = {str(k): dict(zip(names, flat[k * n:(k + 1) * n])) for k in range(stages)}
        row["data_stage"] = flat[-1] // accelerator.num_processes
    return row


def log_row(row: dict[str, Any], accelerator: Accelerator, history: History | None, bar, stdout: bool) -> None:
    """``row`` into the history (main process), onto stdout as ``key=value`` pairs if ``stdout``, and to
    the trackers as scalars (per-source tokens as ``source_tokens/<name>``, a data schedule's as
    ``stage_tokens/<stage>/<name>``)."""
    if accelerator.is_main_process:
        history.write(row)
        if stdout:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                            if not isinstance(v, dict))
            bar.write(text)
            sys.stdout.flush()  # visible at once when stdout is a file (pod logs)
    scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
    for name, n in row.get("source_tokens", {}).items():
        scalars[f"source_tokens/{name}"] = n
    for stage, counts in row.get("stage_tokens", {}).items():  # a data schedule's realized mixture
        for name, n in counts.items():
            scalars[f"stage_tokens/{stage}/{name}"] = n
    accelerator.log(scalars, step=row["step"])
