"""Experiment trackers through Accelerate (``Accelerator(log_with=...)``, ``init_trackers``, ``log``,
``end_training``): ``runtime.logging.report_to`` takes Accelerate's tracker names, with ``none`` and
``all`` as transformers' ``TrainingArguments.report_to`` has them.

Accelerate quietly drops a named tracker whose package is missing (a debug line); a run that was asked
to report to W&B and reports nowhere is found out too late, so a missing package stops the run before
it starts, with the ``pip install`` that fixes it.

TensorBoard keeps writing where the run directory contract says (``<output_dir>/tensorboard``, or
``runtime.logging.tensorboard``'s path): it is handed to Accelerate as a tracker object, so that the
project name the other trackers get (W&B project, MLflow experiment) is ``runtime.experiment``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hf_streamlm.config import Config, ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml", "aim": "aim",
            "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}
"""Accelerate's tracker names -> the package that provides each (what ``pip install`` takes)."""


def tracker_names(config: Config) -> list[str]:
    """The trackers ``runtime.logging.report_to`` asks for, ``all`` expanded to the installed ones;
    ``runtime.logging.tensorboard: false`` leaves TensorBoard out (older recipes say it that way)."""
    from accelerate.tracking import get_available_trackers

    logging = config.runtime.logging
    asked = [logging.report_to] if isinstance(logging.report_to, str) else list(logging.report_to or [])
    asked = [str(name).lower() for name in asked]
    if "all" in asked:
        asked = [str(t.value) for t in get_available_trackers()]
    names = [n for n in dict.fromkeys(asked) if n != "none"]
    if logging.tensorboard is False or logging.tensorboard is None:
        names = [n for n in names if n != "tensorboard"]
    return names


def log_with(config: Config, out: Path) -> list | None:
    """``Accelerator(log_with=...)`` for the run, or None; a tracker whose package is missing is one line."""
    from accelerate.tracking import TensorBoardTracker, get_available_trackers

    names = tracker_names(config)
    available = {str(t.value) for t in get_available_trackers()}
    for name in names:
        if name not in available:
            raise ConfigError(f"runtime.logging.report_to names {name}, which is not installed: pip install "
                              f"{PACKAGES.get(name, name)} (or leave {name} out of report_to)")
    trackers: list = []
    for name in names:
        if name == "tensorboard":
            where = config.runtime.logging.tensorboard
            folder = out / "tensorboard" if where is True else Path(where)
            trackers.append(TensorBoardTracker(folder.name, folder.parent))
        else:
            trackers.append(name)
    return trackers or None


def start_trackers(accelerator, config: Config, out: Path) -> None:
    """``init_trackers`` with the resolved config (flattened to the scalars every tracker stores); W&B
    writes under the run directory unless ``WANDB_DIR`` says otherwise."""
    if not accelerator.log_with:
        return
    wandb = {"name": out.name}
    if not os.environ.get("WANDB_DIR"):
        wandb["dir"] = str(out)
    accelerator.init_trackers(config.runtime.experiment, config=flat_config(config), init_kwargs={"wandb": wandb})


def flat_config(config: Config) -> dict[str, bool | int | float | str]:
    """``{"optimizer.learning_rate": 3e-4, ...}``: TensorBoard's hparams take scalars only; lists and
    nulls go as their JSON text."""
    out: dict[str, bool | int | float | str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:
            out[prefix] = json.dumps(value, default=str)

    walk("", config.to_dict())
    return out
