"""Rollback after repeated loss spikes (``runtime.spikes.rollback_after``, docs/stability.md).

After ``rollback_after`` skipped steps (hf_streamlm.train.spikes) within ``rollback_within`` steps, the run goes back
to the last checkpoint before the first of them, drops what those steps trained on, and goes on; after
``max_rollbacks`` rollbacks, the next one due stops the run instead (:class:`SpikeStop`: one line, exit status 5).

**What is dropped.** With the document trace (``data.trace_documents``), the documents the skipped steps trained on
are appended to ``<run>/skipped_documents.jsonl``, which every reader of the run drops from then on
(:mod:`hf_streamlm.data.skips`): those the trace lists at these steps (their last token is there:
:func:`~hf_streamlm.train.spikes.spike_documents`) and those with tokens in them that end later (a document cut by the step's end, which the
trace lists at a later step; each rank notes them with the skipped step, ``spike_steps`` in the state, and they are
gathered from every rank at the rollback). Without it (or when the trace names no
document for those steps), the same micro-batches are dropped when the stream reaches them again: the stream is
replayed exactly from the checkpoint, so the skipped steps' token ranges are known by their place in it (the
micro-batches each rank read before them, counting those dropped: ``dropped_micro_batches`` in the state).

**How.** Every rank judges the same spikes (one decision for all), so every rank reaches the rollback at the same
step. They meet; the main process reads the trace, writes the records (``rollbacks.jsonl``, one line per rollback,
and the documents), moves the checkpoints past the target into ``checkpoints/rolled-back-<n>/`` and points
``latest.json`` at the target (or removes it: no checkpoint before the first spike, a start from step 0). Every
rank then raises :class:`Rollback` out of the loop, and :func:`hf_streamlm.train.loop.train` starts over in the
same process with ``runtime.resume=auto``, which resumes the target (history, spikes.jsonl and the trace cut back to
it, as for any resume). A later resume of the run directory keeps skipping what the records name.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from hf_streamlm.config import Config
from hf_streamlm.data.skips import SKIPPED_FILE, read_skipped_documents
from hf_streamlm.durable import sync_dir
from hf_streamlm.train.checkpoint import LATEST, STEP_DIR, list_checkpoints, main_decides, write_latest
from hf_streamlm.train.history import read_history
from hf_streamlm.train.spikes import spike_documents

logger = logging.getLogger(__name__)

ROLLBACKS_FILE = "rollbacks.jsonl"
SPIKE_STOP_STATUS = 5
"""The exit status of a run stopped after ``runtime.spikes.max_rollbacks`` rollbacks (docs/troubleshooting.md)."""


class Rollback(Exception):
    """Raised out of the step loop on every rank: :func:`hf_streamlm.train.loop.train` starts over from the
    checkpoint the records name."""


class SpikeStop(RuntimeError):
    """A rollback was due after ``runtime.spikes.max_rollbacks`` rollbacks: the run stopped."""


def read_rollbacks(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rollbacks of a run, in order (``[]`` when none)."""
    path = Path(run_dir) / ROLLBACKS_FILE
    return read_history(path) if path.is_file() else []


def _append(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())


class Rollbacks:
    """The loop's side of the rollback: :meth:`drops` after a step's micro-batches are fetched, :meth:`after_step`
    after a step's decision and trace line. Keeps ``spike_steps`` (``[step, first micro-batch, documents not ended]``
    of the skipped steps within ``rollback_within``) and ``dropped_micro_batches`` in the loop's ``state``, so in
    checkpoints."""

    def __init__(self, config: Config, out: Path, ckpt_dir: Path, accelerator: Accelerator, state: dict[str, Any],
                 resumed_from: Path | None = None):
        s = config.runtime.spikes
        self.after, self.within, self.most = s.rollback_after, s.rollback_within, s.max_rollbacks
        self.gas = config.data.gradient_accumulation_steps
        self.trace = config.data.trace_documents
        self.out, self.ckpt_dir, self.accelerator = Path(out), Path(ckpt_dir), accelerator
        # The checkpoint this run resumed from, which may lie elsewhere (runtime.resume=<path>): a target too.
        self.resumed = (Path(resumed_from), state["step"]) if resumed_from is not None else None
        records = main_decides(accelerator, read_rollbacks(out) if accelerator.is_main_process else None)
        self.done = len(records)
        # Token ranges (no trace): the first stream micro-batch of each rolled-back step.
        self.ranges = {start for row in records if row["mode"] == "tokens" for start in row["micro_batches"]}
        state.setdefault("spike_steps", [])
        state.setdefault("dropped_micro_batches", 0)
        state["rollbacks"] = self.done
        if accelerator.is_main_process:
            state["skipped_documents"] = len(read_skipped_documents(out))

    def _stream_at(self, state: dict[str, Any]) -> int:
        """Micro-batches this rank has taken from the stream (trained and dropped)."""
        return state["micro_batches"] + state["dropped_micro_batches"]

    def drops(self, state: dict[str, Any], loader) -> bool:
        """True when the step's micro-batches just fetched are a rolled-back step's token range: they are dropped
        (counted, logged) and the caller fetches the next ones."""
        start = self._stream_at(state)
        if start not in self.ranges:
            return False
        state["dropped_micro_batches"] += self.gas
        loader.take_documents()  # not trained: not in the trace
        logger.warning("step %d: micro-batches %d to %d dropped, the token range of a rolled-back spike (%s; %s: the "
                       "same range is skipped instead of its documents)", state["step"] + 1, start,
                       start + self.gas - 1, ROLLBACKS_FILE,
                       "the trace named no document" if self.trace else "data.trace_documents=false")
        return True

    def after_step(self, spiked: bool, state: dict[str, Any], loader) -> None:
        """After a step (``state["step"]`` moved on, its trace line written): note a skipped step; raise
        :class:`Rollback` (or :class:`SpikeStop`) when ``rollback_after`` of them fall within ``rollback_within``."""
        if self.after == 0:
            return
        step = state["step"]
        if spiked:
            state["spike_steps"].append([step, self._stream_at(state) - self.gas, list(loader.step_open)])
        state["spike_steps"] = [s for s in state["spike_steps"] if s[0] > step - self.within]
        if spiked and len(state["spike_steps"]) >= self.after:
            self._roll_back(state)

    def _roll_back(self, state: dict[str, Any]) -> None:
        steps = [step for step, *_ in state["spike_steps"]]
        said = f"{len(steps)} skipped steps within {self.within} (steps {', '.join(map(str, steps))})"
        if self.done >= self.most:
            raise SpikeStop(f"loss spikes: {said} after {self.done} rollback(s), runtime.spikes.max_rollbacks="
                            f"{self.most}; stopped (the spikes: {self.out / 'spikes.jsonl'}, the rollbacks: "
                            f"{self.out / ROLLBACKS_FILE}); clean the data or raise runtime.spikes.sigma, then resume")
        self.accelerator.wait_for_everyone()  # every rank's trace line of this step is written
        number = self.done + 1
        opened = [[step, doc] for step, _, docs in state["spike_steps"] for doc in docs]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            opened = gather_object(opened)  # every rank's
        decided = None
        if self.accelerator.is_main_process:
            decided = self._record(number, steps, [start for _, start, _ in state["spike_steps"]], opened)
        target, mode, documents = main_decides(self.accelerator, decided)
        skipped = (f"{documents} document(s) skipped ({self.out / SKIPPED_FILE})" if mode == "documents" else
                   "their micro-batches skipped when the stream reaches them again (no document trace: the same "
                   "token range)")
        logger.warning("loss spikes: %s; rollback %d of at most %d, to %s; %s", said, number, self.most,
                       target or "the start (no checkpoint before them)", skipped)
        for tracker in self.accelerator.trackers:  # started again with the run
            tracker.finish()
        self.accelerator.wait_for_everyone()  # the records and the checkpoints moved before any rank resumes
        raise Rollback(target)

    def _record(self, number: int, steps: list[int], starts: list[int],
                opened: list[list]) -> tuple[str | None, str, int]:
        """Main process: the records written, the newer checkpoints moved aside; ``(target, mode, documents)``."""
        found = spike_documents(self.out, steps) if self.trace else {}
        named = [[step, doc] for step, docs in found.items() for doc in docs] + (opened if self.trace else [])
        docs, seen = [], set()
        for step, (source, key, epoch) in sorted(named, key=lambda row: row[0]):
            if (source, key) not in seen:  # once, at the first skipped step that trained it
                seen.add((source, key))
                docs.append({"source": source, "key": key, "epoch": epoch, "step": step, "rollback": number})
        mode = "documents" if docs else "tokens"
        before = [(int(STEP_DIR.match(p.name).group(1)), p) for p in list_checkpoints(self.ckpt_dir)]
        if self.resumed is not None and self.resumed[0].is_dir():
            before.append((self.resumed[1], self.resumed[0]))
        before = sorted(found for found in before if found[0] < steps[0])
        to_step, target = before[-1] if before else (0, None)
        if docs:
            _append(self.out / SKIPPED_FILE, docs)
        _append(self.out / ROLLBACKS_FILE, [{
            "rollback": number, "steps": steps, "mode": mode, "documents": len(docs),
            "micro_batches": starts if mode == "tokens" else [], "checkpoint": str(target) if target else None,
            "to_step": to_step}])
        self._set_aside(number, target, to_step)
        return (str(target) if target else None), mode, len(docs)

    def _set_aside(self, number: int, target: Path | None, step: int) -> None:
        """The checkpoints past ``target`` (of ``step``) into ``rolled-back-<number>/`` (out of the ``step-<N>``
        pattern: resume and rotation never see them); ``latest.json`` at ``target``, or removed when there is none."""
        newer = [p for p in list_checkpoints(self.ckpt_dir) if int(STEP_DIR.match(p.name).group(1)) > step]
        if target is not None:
            write_latest(self.ckpt_dir, target, step)
        elif (self.ckpt_dir / LATEST).exists():
            (self.ckpt_dir / LATEST).unlink()
        if not newer:
            return
        aside = self.ckpt_dir / f"rolled-back-{number}"
        aside.mkdir(exist_ok=True)
        for path in newer:
            path.rename(aside / path.name)
        sync_dir(aside)
        sync_dir(self.ckpt_dir)


__all__ = ["ROLLBACKS_FILE", "SPIKE_STOP_STATUS", "Rollback", "Rollbacks", "SpikeStop", "read_rollbacks"]
