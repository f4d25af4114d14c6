"""Resuming a checkpoint on another layout (number of processes, DataLoader workers): what may change,
what must not, and what is adjusted.

- **The stream must be the same.** Sources, weights, the mixture's stopping rule, caps, filters, the
  hold-out share, the shuffle buffer, the sequence length, document masking, the tokenizer and the seed
  define which documents a pass holds, in which order, and how they are cut; a resume that changes one is
  refused with one line naming the key (on any layout: a same-layout resume would train on other documents
  than the checkpoint points at). Every key of ``data``, of a source and of ``tokenizer`` is classified in
  :data:`DATA_KEYS`, :data:`SOURCE_KEYS` and :data:`TOKENIZER_KEYS` (a test fails on a key left out).
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

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator

from hf_streamlm.config import Config, ConfigError, SourceConfig
from hf_streamlm.train import safe_load

logger = logging.getLogger(__name__)

STREAM = "stream"
"""A key that decides which documents the training stream holds, in which order, or how they become tokens and
blocks: a resume that changes it is refused in one line naming it (exit 2)."""

# What a resume may do with each key of the data section: STREAM (refused when changed), or why a change is
# handled or does not touch the stream. tests/test_stream_check.py fails on a DataConfig field missing here.
DATA_KEYS: dict[str, str] = {
    "sources": STREAM,  # each field of a source: SOURCE_KEYS
    "train_shards": STREAM,
    "validation_shards": "not the training stream: the held-out data of evaluations",
    "batch_size": "handled: keep_global_batch keeps the checkpoint's sequences per optimizer step through "
                  "gradient accumulation, and a data state that replays batches made at the checkpoint's size "
                  "(DataLoader workers) is handed over as on a layout change (checkpoint.load_checkpoint)",
    "gradient_accumulation_steps": "handled: recomputed by keep_global_batch to keep the checkpoint's sequences "
                                   "per optimizer step",
    "shuffle_buffer_size": STREAM,  # the order within a pass, and the references the data state holds
    "block_shuffle_size": STREAM,  # the order of the blocks, and the blocks the data state holds
    "num_workers": "handled: another number of DataLoader workers is an elastic resume (load_elastic_data)",
    "worker_start_method": "not the stream: how DataLoader workers start",
    "trace_documents": "not the stream: the audit file (turned on at a resume, it starts at the resumed step)",
    "cache_dir": "not the stream: where downloads and processed sources are kept (the same documents)",
    "sequence_length": STREAM,
    "max_samples": STREAM,
    "min_words": STREAM,
    "stopping_strategy": STREAM,
    "drop_last": "not the training stream: the padded last block of a pass counted for scheduler.total_epochs "
                 "(the training stream is endless)",
    "document_masking": STREAM,  # the blocks' position_ids/document_ids, and the packing state's serials
    "mix_by": STREAM,  # which source each document comes from
    "schedule": STREAM,  # the same, along the run
    "mlm_probability": "not the stream: the masked-LM objective (the share of tokens the collator masks, or its "
                       "stages), a training setting as the learning rate is",
    "retries": "not the stream: tries of a failing read",
    "retry_backoff": "not the stream: the wait between those tries",
    "eval_holdout": STREAM,  # which documents are held out of the training stream
}
SOURCE_KEYS: dict[str, str] = {  # every field of a data.sources entry (and of its fallbacks) is compared
    "path": STREAM, "name": STREAM, "split": STREAM, "data_files": STREAM, "revision": STREAM,
    "pinned_revision": STREAM,  # left unset, it is the checkpoint's (filled before the comparison: data.revisions)
    "text_column": STREAM, "weight": STREAM, "streaming": STREAM, "max_samples": STREAM, "min_words": STREAM,
    "cache": STREAM,  # another reader of the source: positions in its shards mean other rows
    "label": "not the stream: a name (the schedule that uses it is compared)",
    "fallbacks": STREAM,
}
TOKENIZER_KEYS: dict[str, str] = {
    **{name: STREAM for name in ("kind", "vocab_size", "min_frequency", "lowercase", "path", "name",
                                 "tokenizer_json", "vocab", "merges", "special_tokens")},
    "train_samples": "not the stream: how many documents trained the tokenizer, which exists by then",
}
# The settings that decide which documents a pass holds and how they become tokens. Beyond data and tokenizer:
# model.type (masked-LM or causal collation) and runtime.seed (shuffle buffer, mixture and masking RNGs); the
# other keys of model, optimizer, scheduler, runtime and hub do not touch the stream.
STREAM_KEYS = {
    "data": tuple(name for name, what in DATA_KEYS.items() if what == STREAM),
    "tokenizer": tuple(name for name, what in TOKENIZER_KEYS.items() if what == STREAM),
    "model": ("type",),
    "runtime": ("seed",),
}


def saved_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load((Path(path) / "config.yaml").read_text())


def _differs(old: Any, new: Any, key: str) -> str | None:
    """The first key under ``key`` whose value differs (lists and dicts walked), or None."""
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
    """Refuse (one line, naming the key) a resume whose config changes what the stream is. The sources' pins
    left unset are the checkpoint's (as :func:`hf_streamlm.data.revisions.pin_hub_sources` fills them next); a
    key the checkpoint's config lacks (written before the key existed) had its default."""
    from hf_streamlm.data.revisions import fill_pins, pins_of

    filled = copy.deepcopy(config)
    fill_pins(filled, pins_of(old))
    new, defaults = filled.to_dict(), Config().to_dict()
    old = {section: {**defaults[section], **(old.get(section) or {})} for section in STREAM_KEYS}
    source = dataclasses.asdict(SourceConfig())
    old["data"]["sources"] = [{**source, **s} if isinstance(s, dict) else s for s in old["data"]["sources"] or []]
    keys = [(f"{section}.{name}", old[section][name], new[section][name])
            for section, names in STREAM_KEYS.items() for name in names]
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
    state = safe_load.load(Path(path) / "data_state_0.pt") if processes else {}
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


def load_elastic_data(accelerator: Accelerator, path: Path, loader, states: list[dict[str, Any]],
                      layout: tuple[int, int]) -> str:
    """Hand the data ``states`` that checkpoint ``path``'s processes wrote (one per rank; their ``layout``:
    processes x DataLoader workers) to this run's readers; returns the ``resumed AxB -> CxD`` line."""
    from hf_streamlm.config import load_config
    from hf_streamlm.data.elastic import origins
    from hf_streamlm.data.pipeline import reader_settings

    processes, workers = layout
    old = load_config([f"recipe={Path(path) / 'config.yaml'}", "runtime.resume=never"])
    handed = origins(states, accelerator.num_processes, loader.num_workers, accelerator.process_index,
                     reader_settings(old, processes, workers))
    loader.load_elastic(handed, min(s.get("epoch", 0) for s in states))
    return f"resumed {processes}x{workers} -> {accelerator.num_processes}x{loader.num_workers}"
