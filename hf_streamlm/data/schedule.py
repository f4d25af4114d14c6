"""Data schedules keyed by tokens trained: the mixture's stages (``data.schedule``) and the masking rate of MicroBERT
(``data.mlm_probability`` given as stages).

A stage ends at ``until``: a fraction of the run's token budget (a number up to 1: ``scheduler.total_tokens``, or
``scheduler.total_steps`` x tokens per optimizer step) or an absolute number of tokens (above 1). Within a stage the
value is constant, or, with ``interpolate: linear``, moves in a straight line from the previous stage's value (at
the stage's start) to its own (at its ``until``). After the last stage its value holds to the end of the run.

Positions are **global** tokens trained (every rank's), so a schedule means the same on any number of processes and
DataLoader workers; a reader converts its own token count with :meth:`hf_streamlm.data.stream.WorkerPipeline.trained`.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from hf_streamlm.config import Config, ConfigError


class Schedule:
    """Stages of a value (a float, or a tuple of per-source weights) by global tokens trained."""

    def __init__(self, ends: Sequence[float], values: Sequence[Any], linear: Sequence[bool]):
        self.ends = list(ends)  # absolute tokens, increasing
        self.values = list(values)
        self.linear = list(linear)

    def stage_at(self, tokens: float) -> int:
        """The stage that trains the token at ``tokens`` (the last stage once past every ``until``)."""
        return min(bisect.bisect_right(self.ends, tokens), len(self.ends) - 1)

    def value_at(self, tokens: float) -> Any:
        i = self.stage_at(tokens)
        value = self.values[i]
        if not self.linear[i] or i == 0:
            return value
        start, end = self.ends[i - 1], self.ends[i]
        t = min(1.0, max(0.0, (tokens - start) / (end - start)))
        before = self.values[i - 1]
        if isinstance(value, tuple):
            return tuple(b + (v - b) * t for b, v in zip(before, value))
        return before + (value - before) * t


def budget_tokens(config: Config, processes: int) -> int | None:
    """The run's token budget: ``scheduler.total_tokens``, else ``total_steps`` x tokens per optimizer step (None:
    a run of ``total_epochs``)."""
    s, d = config.scheduler, config.data
    if s.total_tokens is not None:
        return s.total_tokens
    if s.total_steps is None:
        return None
    return s.total_steps * d.batch_size * d.sequence_length * d.gradient_accumulation_steps * processes


def _ends(config: Config, stages: list[dict], key: str, processes: int | None) -> list[float]:
    """The stages' ``until`` as absolute tokens (checked: increasing, within the run); with ``processes`` None only
    what does not need the run's length is checked."""
    budget = budget_tokens(config, processes) if processes is not None else config.scheduler.total_tokens
    ends, last = [], 0.0
    for i, stage in enumerate(stages):
        until = stage.get("until")
        if isinstance(until, bool) or not isinstance(until, (int, float)) or until <= 0:
            raise ConfigError(f"'{key}[{i}].until' must be a number > 0 (a fraction of the run's tokens up to 1, or "
                              f"tokens), got {until!r}")
        if until <= 1:
            if budget is None:
                if processes is None:
                    ends.append(float("nan"))  # checked at the run's start, when its length is known
                    continue
                raise ConfigError(f"'{key}[{i}].until' is a fraction of the run, which has no token budget: set "
                                  "scheduler.total_tokens or scheduler.total_steps (or give until in tokens)")
            until = until * budget
        if until <= last:
            raise ConfigError(f"'{key}' stages are out of order: stage {i} ends at {until:,.0f} tokens, not after the "
                              f"{last:,.0f} of the stage before")
        if budget is not None and until > budget * (1 + 1e-9):
            raise ConfigError(f"'{key}[{i}]' ends at {until:,.0f} tokens, after the run's {budget:,} tokens: the "
                              "schedule is longer than the run (shorten it or raise the run's budget)")
        ends.append(float(until))
        last = until
    return ends


def _check_keys(stage: Any, key: str, allowed: set[str]) -> None:
    if not isinstance(stage, dict):
        raise ConfigError(f"'{key}' must be a mapping with {', '.join(sorted(allowed))}, got {stage!r}")
    unknown = set(stage) - allowed
    if unknown:
        raise ConfigError(f"'{key}' has unknown key(s) {', '.join(sorted(unknown))}; a stage has "
                          f"{', '.join(sorted(allowed))}")
    if stage.get("interpolate", "none") not in ("none", "linear"):
        raise ConfigError(f"'{key}.interpolate' must be none or linear, got {stage['interpolate']!r}")


def mixture_schedule(config: Config, processes: int | None = None) -> Schedule | None:
    """The mixture's stages as per-source weights (normalized), or None when the sources are mixed by
    ``datasets.interleave_datasets`` (``mix_by: documents`` and no schedule). ``processes`` None: check only."""
    from hf_streamlm.data.sources import source_names, training_sources

    d = config.data
    sources = training_sources(config)
    if not d.schedule:
        if d.mix_by == "documents":
            return None
        total = sum(s.weight for s in sources)
        return Schedule([float("inf")], [tuple(s.weight / total for s in sources)], [False])
    labels = source_names(config)  # labels, else short names
    values, linear = [], []
    for i, stage in enumerate(d.schedule):
        key = f"data.schedule[{i}]"
        _check_keys(stage, key, {"until", "weights", "interpolate"})
        weights = stage.get("weights")
        if not isinstance(weights, dict) or not weights:
            raise ConfigError(f"'{key}.weights' must map source labels to weights, got {weights!r}")
        for name, w in weights.items():
            if name not in labels:
                raise ConfigError(f"'{key}.weights' names '{name}', which is no source; the sources are: "
                                  f"{', '.join(labels)} (set a source's label)")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise ConfigError(f"'{key}.weights.{name}' must be a number >= 0, got {w!r}")
        total = sum(weights.values())
        if total <= 0:
            raise ConfigError(f"'{key}.weights' are all 0: a stage needs a source to read")
        values.append(tuple(weights.get(label, 0) / total for label in labels))
        linear.append(stage.get("interpolate", "none") == "linear")
    return Schedule(_ends(config, d.schedule, "data.schedule", processes), values, linear)


def mlm_schedule(config: Config, processes: int | None = None) -> Schedule | None:
    """``data.mlm_probability`` given as stages (``value`` per stage), or None for a fixed rate."""
    rate = config.data.mlm_probability
    if not isinstance(rate, list):
        return None
    if not rate:
        raise ConfigError("'data.mlm_probability' is an empty list: give a rate, or stages with until and value")
    values, linear = [], []
    for i, stage in enumerate(rate):
        key = f"data.mlm_probability[{i}]"
        _check_keys(stage, key, {"until", "value", "interpolate"})
        value = stage.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ConfigError(f"'{key}.value' must be in (0, 1), got {value!r}")
        values.append(float(value))
        linear.append(stage.get("interpolate", "none") == "linear")
    return Schedule(_ends(config, rate, "data.mlm_probability", processes), values, linear)


def first_rate(config: Config) -> float:
    """The masking rate the run starts with: evaluations mask at it all along, so their figures compare."""
    rate = config.data.mlm_probability
    return float(rate[0]["value"]) if isinstance(rate, list) else float(rate)


def check_schedules(config: Config) -> None:
    """The data schedules' one-line errors, before anything runs (:func:`mixture_schedule`, :func:`mlm_schedule`),
    and the settings that belong to the ``datasets`` mixture, refused with a schedule."""
    d = config.data
    mlm_schedule(config)
    if mixture_schedule(config) is None:
        return
    if d.max_samples is not None:
        raise ConfigError("'data.max_samples' caps the datasets mixture; with data.schedule or data.mix_by=tokens "
                          "each source is read on its own: cap each with data.sources[].max_samples")
    if d.stopping_strategy != "all_exhausted":
        raise ConfigError("'data.stopping_strategy' applies to the datasets mixture; with data.schedule or "
                          "data.mix_by=tokens every source is read pass after pass on its own (leave it unset)")
