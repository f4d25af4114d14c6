"""Checkpoints under ``<run>/checkpoints/step-<N>/``: written to a temporary folder and renamed
when complete, so a folder named ``step-<N>`` is always whole; the newest N are kept."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from hf_streamlm.config import Config, ConfigError

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
) -> Path:
    """Save everything needed to resume, and to export (config and tokenizer travel with it).

    Every rank writes its own data-stream state (shuffle buffer, packing remainder, RNGs, source
    positions); the main process marks the folder complete and renames it once all ranks are done.
    """
    final = directory / f"step-{state['step']}"
    tmp = directory / f".tmp-step-{state['step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # model, optimizer, scheduler, RNG states, scaler; per rank
    if loader is not None:
        torch.save(loader.state_dict(), data_state_file(tmp, accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        config.save(tmp / "config.yaml")
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # written last: marks completeness
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(directory)[:-max_keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(config: Config, directory: Path) -> Path | None:
    """The checkpoint to resume from according to ``runtime.resume``, or None."""
    mode = config.runtime.resume
    if mode == "never":
        return None
    if mode == "auto":
        found = list_checkpoints(directory)
        return found[-1] if found else None
    return Path(mode)


def load_checkpoint(accelerator: Accelerator, path: Path, loader=None) -> dict[str, Any]:
    accelerator.load_state(str(path))
    if loader is not None:
        data_state = data_state_file(path, accelerator.process_index)
        if not data_state.is_file():
            raise ConfigError(f"checkpoint {path} has no data state for rank {accelerator.process_index} ({data_state.name}):"
                              " it was written by a run with fewer processes; resume with the same number")
        # Our own file (lists, RNG tuples): not a tensor-only pickle, hence weights_only=False.
        loader.load_state_dict(torch.load(data_state, weights_only=False))
    return json.loads((path / STATE_FILE).read_text())
