"""One logged row of the run: assembled from the ranks, then written to ``history.jsonl``, stdout (above
the progress bar) and the trackers (``runtime.logging.report_to``)."""

from __future__ import annotations

import sys
from typing import Any

import torch
from accelerate import Accelerator

from hf_streamlm.data.quality import SKIP_KINDS
from hf_streamlm.train.history import History


def source_counts(loader, names: list[str], accelerator: Accelerator) -> dict[str, dict[str, int]]:
    """Documents and tokens read so far from each source, and documents skipped by kind (empty,
    null, not text, too short), summed over ranks."""
    docs, tokens = loader.source_counts()
    local = torch.tensor([docs.get(i, 0) for i in range(len(names))] + [tokens.get(i, 0) for i in range(len(names))],
                         dtype=torch.long, device=accelerator.device)
    skipped = loader.skip_counts()
    local = torch.cat([local, torch.tensor([skipped.get(k, 0) for k in SKIP_KINDS], device=accelerator.device)])
    total = accelerator.reduce(local, reduction="sum").tolist()
    n = len(names)
    return {
        "source_docs": dict(zip(names, total[:n])),
        "source_tokens": dict(zip(names, total[n : 2 * n])),
        "skipped": {k: v for k, v in zip(SKIP_KINDS, total[2 * n :]) if v},
    }


def log_row(row: dict[str, Any], accelerator: Accelerator, history: History | None, bar, stdout: bool) -> None:
    """``row`` into the history (main process), onto stdout as ``key=value`` pairs if ``stdout``, and to
    the trackers as scalars (per-source tokens as ``source_tokens/<name>``)."""
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
    accelerator.log(scalars, step=row["step"])
