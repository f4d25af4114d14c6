"""Checkpoints under ``<run>/checkpoints/step-<N>/``: written to a temporary folder and renamed
when complete, so a folder named ``step-<N>`` is always whole; the newest N are kept."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from hf_streamlm.config import Config, ConfigError

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def data_state_file(path: Path, rank: int) -> Path:
    return path / f"data_state_{rank}.pt"


def save_checkpoint(
    accelerator: Accelerator,
    config: Config,
    tokenizer,
    directory: Path,
    state: dict[str, Any],
    max_keep: int,
    loader=None,
    rank_by: str | None = None,
) -> Path:
    """Save everything needed to resume, and to export (config and tokenizer travel with it).

    Every rank writes its own data-stream state (shuffle buffer, packing remainder, RNGs, source
    positions); the main process marks the folder complete and renames it once all ranks are done.
    Then the newest ``max_keep`` are kept, or with ``rank_by="eval_loss"`` (``best/``) the lowest.
    """
    final = directory / f"step-{state['step']}"
    tmp = directory / f".tmp-step-{state['step']}"
    if accelerator.is_main_process:
        remove_partial(directory)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # model, optimizer, scheduler, RNG states, scaler; per rank
    if loader is not None:
        torch.save(loader.state_dict(), data_state_file(tmp, accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        config.save(tmp / "config.yaml")
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # written last: marks completeness
        replace_dir(tmp, final)
        rotate(directory, max_keep, rank_by)
    accelerator.wait_for_everyone()
    return final


def rotate(directory: Path, max_keep: int, rank_by: str | None = None) -> None:
    """Delete all but the newest ``max_keep`` checkpoints, or with ``rank_by="eval_loss"`` all but
    the ``max_keep`` with the lowest eval loss."""
    found = list_checkpoints(directory)  # oldest first
    if rank_by == "eval_loss":
        found.sort(key=eval_loss, reverse=True)  # worst first
    for old in found[:-max_keep]:
        remove_dir(old)


def remove_partial(directory: Path) -> None:
    """Delete what a kill mid-save left behind (``.tmp-step-<N>``, ``.deleting-step-<N>``); never resumed
    from, but as large as a checkpoint."""
    if not directory.is_dir():
        return
    for leftover in directory.glob(".tmp-*"):
        logger.warning("removing %s: an incomplete checkpoint (the run was stopped while writing it)", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in directory.glob(".deleting-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Delete a checkpoint so that a kill midway never leaves a ``step-<N>`` that looks complete:
    renamed out of the name pattern first (atomic), then deleted."""
    doomed = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` into place as ``final`` (replacing an older one of the same step)."""
    if final.exists():
        remove_dir(final)
    tmp.rename(final)


def eval_loss(path: Path) -> float:
    """The eval loss a checkpoint was saved with (``inf`` when it has none)."""
    return json.loads((path / STATE_FILE).read_text()).get("eval", {}).get("eval_loss", float("inf"))


def qualifies_as_best(directory: Path, loss: float, max_keep: int) -> bool:
    """Whether a checkpoint with eval ``loss`` belongs among the ``max_keep`` best in ``directory``."""
    if max_keep <= 0 or loss != loss:  # NaN never qualifies
        return False
    kept = sorted(eval_loss(p) for p in list_checkpoints(directory))
    return len(kept) < max_keep or loss < kept[max_keep - 1]


def save_best(accelerator: Accelerator, config: Config, tokenizer, directory: Path, state: dict[str, Any],
              max_keep: int, loader=None, saved: Path | None = None) -> Path:
    """Keep this step among the ``max_keep`` best by eval loss in ``directory`` (``best/``). When the
    step's regular checkpoint was just written (``saved``), its files are hard-linked, not written
    again (checkpoint files are never modified in place, so the two stay independent)."""
    if saved is None:
        return save_checkpoint(accelerator, config, tokenizer, directory, state, max_keep, loader, rank_by="eval_loss")
    final, tmp = directory / saved.name, directory / f".tmp-{saved.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(saved, tmp, copy_function=os.link)
        except OSError:  # another file system, or no hard links: copy
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(saved, tmp)
        replace_dir(tmp, final)
        rotate(directory, max_keep, rank_by="eval_loss")
    accelerator.wait_for_everyone()
    return final


def resolve_resume(config: Config, directory: Path) -> Path | None:
    """The checkpoint to resume from according to ``runtime.resume``, or None."""
    mode = config.runtime.resume
    if mode == "never":
        found = list_checkpoints(directory)
        if found:
            raise ConfigError(
                f"runtime.resume=never, but {directory} holds checkpoints of an earlier run (newest {found[-1].name}); "
                "a fresh run there would mix with them: choose another runtime.output_dir, or delete that folder"
            )
        return None
    if mode == "auto":
        found = list_checkpoints(directory)
        return found[-1] if found else None
    return Path(mode)


def load_checkpoint(accelerator: Accelerator, path: Path, loader=None) -> dict[str, Any]:
    if loader is not None:
        # Each rank's place in the stream is its own: with another number of processes some would be
        # lost (documents skipped) or missing, so the counts must agree.
        written = len(list(path.glob("data_state_*.pt")))
        if written != accelerator.num_processes:
            raise ConfigError(f"checkpoint {path} was written by {written} process(es) and this run has "
                              f"{accelerator.num_processes}: resume with {written} (each rank's stream position is "
                              "its own), or start a new runtime.output_dir")
    accelerator.load_state(str(path))
    if loader is not None:
        data_state = data_state_file(path, accelerator.process_index)
        # Our own file (lists, RNG tuples): not a tensor-only pickle, hence weights_only=False.
        loader.load_state_dict(torch.load(data_state, weights_only=False))
    return json.loads((path / STATE_FILE).read_text())
