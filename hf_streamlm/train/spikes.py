"""Loss spikes (``runtime.spikes``, docs/stability.md): a step whose loss or gradient norm is far above its recent
history is not applied.

**The rule** is OLMo-core's ``SkipStepAdamW`` (``olmo_core/optim/skip_step_optimizer.py``, used by OLMo 2's
anneal): a step is skipped when ``value - mean > sigma x std`` for its loss or its gradient norm, the mean and the
(unbiased) standard deviation taken over the ``window`` steps before it, once the window holds ``min_steps``
(defaults 6, 128 and 64, OLMo-core's ``sigma_factor``, ``rolling_interval_length`` and its half).

**Where it is decided.** OLMo-core computes the verdict on the device and masks the update inside its own AdamW,
because its loop never reads a value back per step. This loop does, once per optimizer step: the non-finite guard's
verdict and the stop flags (:class:`hf_streamlm.train.monitor.NonFiniteGuard`). The step's mean loss and gradient
norm travel in that same read-back (the same all-reduce across ranks, the same single copy to the host), and the
verdict is taken on the host from them; a skipped step simply does not call ``optimizer.step()``. So the spike
check adds no read-back and no collective, works with any optimizer (AdamW, Muon) without a copy of the weights or
of the optimizer state, and leaves that state bit for bit untouched (no moment decays, no step counted). Every rank
judges the same reduced numbers with the same window: one decision for all ranks.

**One difference from OLMo-core, on purpose.** OLMo-core puts every step's values into the window, spikes
included: one loss of 1e9 then inflates the standard deviation so much that nothing is skipped until it leaves
the window, 128 steps later. Here a skipped step enters the window at the threshold it crossed (winsorised): a
huge spike cannot blind the detector, and a lasting shift of the level (a new data mixture) still raises the
threshold step by step until it is adopted (tests/test_spikes.py measures both). Non-finite values never enter
the window: they are the non-finite guard's business (``runtime.on_nonfinite``).

**Records.** The window is part of every checkpoint (``trainer_state.json``, ``spike_window``: a resumed run judges
as the uninterrupted one would); the count is ``spike_skips`` in history.jsonl; each skipped step is a line of
``<run>/spikes.jsonl`` (:func:`read_spikes`), whose documents the document trace names (:func:`spike_documents`).
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_streamlm.config import Config, ConfigError
from hf_streamlm.config.sections import SpikesConfig
from hf_streamlm.data.trace import trace_folder
from hf_streamlm.train.history import History, read_history

logger = logging.getLogger(__name__)

SPIKES_FILE = "spikes.jsonl"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and unbiased standard deviation (``torch.std_mean``'s, as OLMo-core takes them) of 2 or more values."""
    n = len(values)
    mean = math.fsum(values) / n
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


class SpikeWindow:
    """The loss and gradient norm of the last ``window`` steps, and the verdict on the next one (:meth:`judge`)."""

    def __init__(self, config: SpikesConfig, state: dict[str, list[float]] | None = None):
        self.sigma, self.min_steps = config.sigma, config.min_steps
        self.losses: deque[float] = deque(maxlen=config.window)
        self.grad_norms: deque[float] = deque(maxlen=config.window)
        if state:  # a checkpoint's (the newest values last); one of another window length keeps its newest
            self.losses.extend(state["losses"])
            self.grad_norms.extend(state["grad_norms"])

    def judge(self, loss: float, grad_norm: float | None) -> dict[str, Any] | None:
        """Record the step's values; return what made it a spike (to be skipped), or None to apply it.

        ``grad_norm`` None (an engine that does not report it) judges the loss alone; a non-finite value is left
        to the non-finite guard (never a spike, never recorded)."""
        norm = 0.0 if grad_norm is None else grad_norm
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return None
        spike = None
        if len(self.losses) >= self.min_steps:
            (loss_mean, loss_std), (norm_mean, norm_std) = mean_std(self.losses), mean_std(self.grad_norms)
            loss_limit, norm_limit = loss_mean + self.sigma * loss_std, norm_mean + self.sigma * norm_std
            over = [name for name, value, limit in (("loss", loss, loss_limit), ("grad_norm", norm, norm_limit))
                    if value > limit and not (name == "grad_norm" and grad_norm is None)]
            if over:
                spike = {"loss": loss, "grad_norm": grad_norm, "over": over, "window": len(self.losses),
                         "loss_mean": loss_mean, "loss_std": loss_std, "grad_norm_mean": norm_mean,
                         "grad_norm_std": norm_std, "sigma": self.sigma}
                loss, norm = min(loss, loss_limit), min(norm, norm_limit)  # winsorised (module docstring)
        self.losses.append(loss)
        self.grad_norms.append(norm)
        return spike

    def state_dict(self) -> dict[str, list[float]]:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms)}


def check_spikes_engine(config: Config, distributed_type: str) -> None:
    """Refuse ``runtime.spikes`` where the engine applies the update inside ``backward()`` (DeepSpeed under
    Accelerate), before the step's loss and gradient norm can be judged."""
    if config.runtime.spikes.enabled and str(distributed_type).rsplit(".", 1)[-1] == "DEEPSPEED":
        raise ConfigError("runtime.spikes.enabled=true cannot veto a DeepSpeed step: the engine applies the update "
                          "inside backward(), before the step's loss and gradient norm are known; run DDP or FSDP "
                          "(accelerate_configs/), or set runtime.spikes.enabled=false")


class SpikeLog:
    """``<run>/spikes.jsonl``, one line per skipped step, and the ``spike_skips`` count and window in the loop's
    ``state`` (so every checkpoint, whichever path saves it, carries the window of its step). Main process writes;
    on resume the lines past the resumed step are dropped first (as history.jsonl's), with spikes on or off."""

    def __init__(self, out: Path, state: dict[str, Any], main_process: bool, rank: int):
        self.file = History(Path(out) / SPIKES_FILE, resume_step=state["step"]) if main_process else None
        self.rank = rank

    def after_step(self, window: SpikeWindow, spike: dict[str, Any] | None, state: dict[str, Any]) -> None:
        """After the step's decision (``state["step"]`` not yet moved on): keep ``window`` in the state; count and
        record the step when it was a ``spike`` (the guard's ``spikes`` and ``spike``)."""
        state["spike_window"] = window.state_dict()
        if spike is None:
            return
        state["spike_skips"] += 1
        step = state["step"] + 1
        # Every rank says it (the launcher's log shows that all skipped the same step); values are the ranks' mean.
        logger.warning("rank %d: step %d: loss %.4g, grad norm %s above %g sigma of the last %d steps (loss %.4g "
                       "+- %.3g, grad norm %.4g +- %.3g); update skipped (%d spike(s) so far)", self.rank, step,
                       spike["loss"], "n/a" if spike["grad_norm"] is None else f"{spike['grad_norm']:.4g}",
                       spike["sigma"], spike["window"], spike["loss_mean"], spike["loss_std"],
                       spike["grad_norm_mean"], spike["grad_norm_std"], state["spike_skips"])
        if self.file is not None:
            self.file.write({"step": step, **spike})


def read_spikes(run_dir: str | Path) -> list[dict[str, Any]]:
    """The skipped steps of a run, in order (``[]`` when none, or when ``runtime.spikes`` was off)."""
    path = Path(run_dir) / SPIKES_FILE
    return read_history(path) if path.is_file() else []


def spike_documents(run_dir: str | Path, steps: list[int] | None = None) -> dict[int, list[list]]:
    """The documents each skipped step trained on, from the document trace of every rank (``data.trace_documents``):
    ``{step: [[source_index, key, epoch], ...]}`` (``steps``: these instead of :func:`read_spikes`' steps). A
    document is listed at the step that holds its last token (hf_streamlm.data.trace), so one that starts in an
    earlier step is listed only if it ends in a skipped one. ``{}`` for a run without a trace."""
    wanted = set(steps if steps is not None else [row["step"] for row in read_spikes(run_dir)])
    found: dict[int, list[list]] = {step: [] for step in sorted(wanted)}
    for path in sorted(trace_folder(run_dir).glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: past every checkpoint
                continue
            if row["step"] in wanted:
                found[row["step"]].extend(row["docs"])
    return found if trace_folder(run_dir).is_dir() else {}


__all__ = ["SPIKES_FILE", "SpikeLog", "SpikeWindow", "check_spikes_engine", "mean_std", "read_spikes",
           "spike_documents"]
