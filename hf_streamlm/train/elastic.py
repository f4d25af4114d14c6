"""Resuming a checkpoint on another layout (number of processes, DataLoader workers): what may change,
what must not, and what is adjusted.

- **The stream must be the same.** Sources, weights, the mixture's stopping rule, caps, filters, the
  hold-out share, the sequence length, the tokenizer and the seed define which documents a pass holds
  and how they are cut; a resume that changes one is refused with one line naming the key (on any
  layout: a same-layout resume would train on other documents than the checkpoint points at).
- **The global batch is kept.** Tokens per optimizer step (batch size x sequence length x gradient
  accumulation x processes) stay the checkpoint's: gradient accumulation is recomputed for the new
  number of processes and logged, or the resume is refused when no whole number keeps it.
- **Model, optimizer and scheduler continue.** Under DDP they are the same on every rank, so any number
  of processes loads them. DeepSpeed ZeRO shards the optimizer state per rank; a resume on another
  number of processes is refused with one line (DeepSpeed's universal checkpoint conversion is not
  wired in).
- **The data state is handed out** to the new readers (:mod:`hf_streamlm.data.elastic`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator

from hf_streamlm.config import Config, ConfigError

logger = logging.getLogger(__name__)

# The settings that decide which documents a pass holds and how they become tokens.
STREAM_KEYS = {
    "data": ("sources", "train_shards", "max_samples", "min_words", "stopping_strategy", "eval_holdout",
             "sequence_length"),
    "model": ("type",),
    "runtime": ("seed",),
}
TOKENIZER_SKIP = ("train_samples",)  # how many documents trained it: irrelevant once it exists


def saved_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load((Path(path) / "config.yaml").read_text())


def _differs(old: Any, new: Any, key: str) -> str | None:
    """The first key under ``key`` whose value differs (lists and dicts walked), or None. A source's
    ``pinned_revision`` left unset reads the checkpoint's pin (``data.revisions``): not a change."""
    if key.endswith(".pinned_revision") and new is None:
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        for name in sorted(set(old) | set(new)):
            found = _differs(old.get(name), new.get(name), f"{key}.{name}")
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = _differs(a, b, f"{key}[{i}]")
            if found:
                return found
        return None
    return None if old == new else key


def check_same_stream(old: dict[str, Any], config: Config) -> None:
    """Refuse (one line, naming the key) a resume whose config changes what the stream is."""
    new = config.to_dict()
    keys = [(f"{section}.{name}", old.get(section, {}).get(name), new[section][name])
            for section, names in STREAM_KEYS.items() for name in names]
    keys += [(f"tokenizer.{name}", old.get("tokenizer", {}).get(name), value)
             for name, value in new["tokenizer"].items() if name not in TOKENIZER_SKIP]
    for key, before, now in keys:
        changed = _differs(before, now, key)
        if changed:
            raise ConfigError(f"{changed} differs from the checkpoint's ({_value(old, changed)!r} -> "
                              f"{_value(new, changed)!r}): it changes the data stream, so the checkpoint's place in "
                              "it means other documents; resume with the checkpoint's value or start a new "
                              "runtime.output_dir")


def check_same_optimizer(old: dict[str, Any], config: Config) -> None:
    """Refuse (one line) a resume with another ``optimizer.algorithm``: the checkpoint holds the other one's state."""
    before = old.get("optimizer", {}).get("algorithm", "adam_w")
    if before != config.optimizer.algorithm:
        raise ConfigError(f"optimizer.algorithm differs from the checkpoint's ({before!r} -> "
                          f"{config.optimizer.algorithm!r}): its optimizer state is {before}'s; resume with the "
                          "checkpoint's value or start a new runtime.output_dir")


def _value(tree: dict, key: str) -> Any:
    node: Any = tree
    for part in key.replace("[", ".").replace("]", "").split("."):
        try:
            node = node[int(part)] if isinstance(node, list) else node.get(part)
        except (AttributeError, IndexError, ValueError):
            return None
    return node


def saved_layout(path: Path) -> tuple[int, int]:
    """(processes, DataLoader workers per process) that wrote the checkpoint's data state."""
    processes = len(list(Path(path).glob("data_state_*.pt")))
    state = torch.load(Path(path) / "data_state_0.pt", weights_only=False) if processes else {}
    return processes, state.get("num_workers", 0)


def keep_global_batch(config: Config, accelerator: Accelerator, path: Path) -> None:
    """Before anything is built from the config: refuse a changed stream or optimizer, and set gradient accumulation
    so that an optimizer step holds as many tokens as the checkpoint's did."""
    old = saved_config(path)
    check_same_stream(old, config)
    check_same_optimizer(old, config)
    processes = len(list(Path(path).glob("data_state_*.pt"))) or accelerator.num_processes
    d, now = config.data, accelerator.num_processes
    if processes != now and (Path(path) / "pytorch_model").exists():
        raise ConfigError(f"checkpoint {path} was written by {processes} DeepSpeed process(es) and this run has {now}: "
                          "ZeRO shards the optimizer state per rank and hf_streamlm does not convert it (DeepSpeed's "
                          f"universal checkpoint); resume with {processes} processes")
    od = old.get("data", {})
    sequences = od.get("batch_size", d.batch_size) * od.get("gradient_accumulation_steps", 1) * processes
    if sequences == d.batch_size * d.gradient_accumulation_steps * now:
        return
    steps, rest = divmod(sequences, d.batch_size * now)
    if rest or steps < 1:
        raise ConfigError(f"the checkpoint's optimizer step holds {sequences} sequences of {d.sequence_length} tokens "
                          f"({processes} process(es)); {now} process(es) x data.batch_size={d.batch_size} cannot make "
                          "that with a whole data.gradient_accumulation_steps: choose a number of processes or a "
                          "data.batch_size that divides it")
    if accelerator.is_main_process:
        logger.warning("data.gradient_accumulation_steps %d -> %d: keeps the checkpoint's %d sequences (%d tokens) per "
                       "optimizer step on %d process(es)", d.gradient_accumulation_steps, steps, sequences,
                       sequences * d.sequence_length, now)
    d.gradient_accumulation_steps = steps
    accelerator.gradient_accumulation_steps = steps


def load_elastic_data(accelerator: Accelerator, path: Path, loader, state_file: Callable[[Path, int], Path]) -> str:
    """Hand the data state that ``path``'s processes wrote (rank r's in ``state_file(path, r)``) to this
    run's readers; returns the ``resumed AxB -> CxD`` line."""
    from hf_streamlm.config import load_config
    from hf_streamlm.data.elastic import origins
    from hf_streamlm.data.pipeline import buffer_per_worker

    processes, workers = saved_layout(path)
    states = [torch.load(state_file(path, r), weights_only=False) for r in range(processes)]
    old = load_config([f"recipe={Path(path) / 'config.yaml'}", "runtime.resume=never"])
    settings = {"batch_size": old.data.batch_size, "with_documents": old.data.document_masking,
                "buffer": buffer_per_worker(old, processes, max(1, workers), rank=-1)}
    handed = origins(states, accelerator.num_processes, loader.num_workers, accelerator.process_index, settings)
    loader.load_elastic(handed, min(s.get("epoch", 0) for s in states))
    return f"resumed {processes}x{workers} -> {accelerator.num_processes}x{loader.num_workers}"
