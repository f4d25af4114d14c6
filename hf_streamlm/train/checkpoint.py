"""Checkpoints under ``<run>/checkpoints/step-<N>/``: written to a temporary folder, flushed to disk
and renamed when complete, so a folder named ``step-<N>`` is always whole; the newest N are kept.
A manifest of file sizes lets a resume tell a checkpoint damaged afterwards (a file lost or cut short
by a crash of the file system, a partial copy) and fall back to the previous one. A checkpoint's model
is read back here too (``hf-streamlm export``/``eval``, and the export at the end of a DeepSpeed run).

**The timeline.** ``checkpoints/latest.json`` names the checkpoint the run last completed (written after
each save's rename, and at a resume): ``runtime.resume=auto`` follows it, not the highest step. A run resumed
from a checkpoint older than the newest moves the newer ones, another timeline, aside into
``checkpoints/abandoned-<UTC time>/`` (out of the ``step-<N>`` pattern: rotation and ``auto`` never see
them), with one log line naming them."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from transformers import PreTrainedModel

from hf_streamlm.config import Config, ConfigError, load_config
from hf_streamlm.durable import sync_dir, write_synced
from hf_streamlm.data.trace import RECORD as TRACE_RECORD
from hf_streamlm.data.trace import record_lengths, trace_folder
from hf_streamlm.train import safe_load
from hf_streamlm.train.fsdp import fsdp_checkpoint_weights, is_fsdp_checkpoint
from hf_streamlm.train.zero import is_zero_checkpoint, without_zero3_init, zero_checkpoint_weights

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
LATEST = "latest.json"  # {"checkpoint": name in the folder (or a path elsewhere), "step": N}: what auto follows
MANIFEST = "manifest.json"  # {relative path: size in bytes} of every other file; written before STATE_FILE


def main_decides(accelerator: Accelerator, value):
    """``value`` as the main process computed it, on every rank: decisions that read the file system
    (which checkpoint to resume, whether an eval makes best/) are taken once, since a network volume
    can show two nodes different listings and ranks that disagree wait in different collectives."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value if accelerator.is_main_process else None])[0]


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
    if config.data.trace_documents:  # the trace's length now, on disk: a resume cuts the trace back to it
        lengths = record_lengths(trace_folder(config.output_dir), accelerator.process_index, accelerator.num_processes)
        write_synced(tmp / TRACE_RECORD.format(rank=accelerator.process_index), json.dumps(lengths))
    # Each rank flushes what it wrote (on a network file system only the writer's fsync counts); files
    # of other ranks still being written are flushed again by their writers.
    sync_tree(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        config.save(tmp / "config.yaml")
        tokenizer.save_pretrained(tmp / "tokenizer")
        write_synced(tmp / MANIFEST, json.dumps(manifest(tmp), indent=1))
        write_synced(tmp / STATE_FILE, json.dumps(state, indent=2))  # written last: marks completeness
        sync_tree(tmp)  # the files, then the folders: the rename below must not outrun their contents
        replace_dir(tmp, final)
        sync_dir(directory)  # the rename itself
        if rank_by is None:  # best/ has no timeline of its own
            write_latest(directory, final, state["step"])
        rotate(directory, max_keep, rank_by)
    accelerator.wait_for_everyone()
    return final


def sync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder, deepest first."""
    if not root.is_dir():
        return
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            try:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            except FileNotFoundError:  # removed meanwhile by another rank's save_state
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_dir(Path(folder))


def manifest(root: Path) -> dict[str, int]:
    """Size of every file under ``root`` (but the manifest and the state file), by relative path."""
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST, STATE_FILE)}


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint folder (a file missing or of another size than written), or None.
    Checkpoints written before the manifest existed are taken as they are."""
    try:
        json.loads((path / STATE_FILE).read_text())
        if not (path / MANIFEST).exists():
            return None
        expected = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} or {MANIFEST} unreadable ({type(err).__name__})"
    for name, size in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def write_latest(directory: Path, checkpoint: Path, step: int) -> None:
    """Point ``latest.json`` at ``checkpoint`` (atomic: written aside, flushed, renamed, the rename flushed)."""
    checkpoint = Path(checkpoint)
    name = checkpoint.name if checkpoint.parent.resolve() == Path(directory).resolve() else str(checkpoint.resolve())
    tmp = directory / f".{LATEST}.tmp"  # not .tmp-*: that is a partial checkpoint (remove_partial)
    write_synced(tmp, json.dumps({"checkpoint": name, "step": step}))
    os.replace(tmp, directory / LATEST)
    sync_dir(directory)


def read_latest(directory: Path) -> tuple[Path | None, str | None]:
    """``(checkpoint, None)`` that ``latest.json`` names, or ``(None, why)`` when there is none to follow."""
    try:
        record = json.loads((directory / LATEST).read_text())
        return directory / record["checkpoint"], None
    except FileNotFoundError:
        return None, f"{directory / LATEST} is missing (a run of an older hf_streamlm, or a copy without it)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"{directory / LATEST} is unreadable ({type(err).__name__})"


def abandon_newer(accelerator: Accelerator, directory: Path, resumed: Path, step: int) -> list[Path]:
    """After a resume from ``resumed`` (step ``step``), on the main process: point ``latest.json`` at it, then move
    the checkpoints of ``directory`` past ``step`` (the timeline left) into ``abandoned-<UTC time>/``, with one log
    line. The record first: a kill before the move leaves them behind a record that ``auto`` follows past them."""
    if not accelerator.is_main_process or not directory.is_dir():
        return []
    newer = [p for p in list_checkpoints(directory) if int(STEP_DIR.match(p.name).group(1)) > step]
    write_latest(directory, resumed, step)
    if not newer:
        return []
    stamp = f"abandoned-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    aside, n = directory / stamp, 1
    while aside.exists():  # two resumes within a second
        n += 1
        aside = directory / f"{stamp}-{n}"
    aside.mkdir()
    for path in newer:
        path.rename(aside / path.name)
    sync_dir(aside)
    sync_dir(directory)
    logger.warning("resumed from %s (step %d), older than the newest checkpoint: %s moved aside to %s (the timeline "
                   "left; runtime.resume=auto and rotation never use them)", resumed, step,
                   ", ".join(p.name for p in newer), aside)
    return [aside / p.name for p in newer]


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
        sync_tree(tmp)  # hard links: only the new folder entries still need flushing
        replace_dir(tmp, final)
        sync_dir(directory)
        rotate(directory, max_keep, rank_by="eval_loss")
    accelerator.wait_for_everyone()
    return final


def resume_choice(config: Config, directory: Path) -> tuple[Path | None, str | None]:
    """``(checkpoint, None)`` to resume from (``None`` for a fresh start), or ``(None, why)`` when the
    resume is refused: a value to share from the main process, which alone reads the folder. The chosen checkpoint's
    pickles are read the restricted way first (:func:`hf_streamlm.train.safe_load.audit`): one that names anything
    else refuses the resume in one line naming it, on every rank at once."""
    try:
        chosen = resolve_resume(config, directory)
        if chosen is not None:
            safe_load.audit(chosen)
        return chosen, None
    except ConfigError as err:
        return None, str(err)


def resolve_resume(config: Config, directory: Path) -> Path | None:
    """The checkpoint to resume from according to ``runtime.resume``, or None. ``auto`` follows
    ``latest.json``; when it is missing or names a checkpoint that is gone or damaged (a warning), the newest
    intact one, passing over damaged ones (a warning each)."""
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
        if not found:
            return None
        latest, why = read_latest(directory)
        if latest is not None:
            why = damage(latest) if (latest / STATE_FILE).is_file() else f"it names {latest}, which is not a complete checkpoint"
            if why is None:
                return latest
            why = f"{directory / LATEST}: {why}"
        logger.warning("%s; resuming from the newest intact checkpoint instead", why)
        for candidate in reversed(found):
            why = damage(candidate)
            if why is None:
                return candidate
            logger.warning("skipping checkpoint %s: %s; resuming from an earlier one", candidate, why)
        return None
    why = damage(Path(mode)) if (Path(mode) / STATE_FILE).is_file() else f"it has no {STATE_FILE}"
    if why:
        raise ConfigError(f"runtime.resume={mode}: not a complete checkpoint ({why})")
    return Path(mode)


def load_checkpoint(accelerator: Accelerator, path: Path, loader=None, batch_size: int | None = None) -> dict[str, Any]:
    """Load the training state and the data state. A checkpoint of another layout (processes x DataLoader
    workers) hands its data state out to this run's readers (:mod:`hf_streamlm.train.elastic`), and so does one
    of the same layout whose data state replays batches made at another ``data.batch_size`` (``batch_size``:
    this run's): replayed at the new size, they would end elsewhere in the stream. Each data state file is read
    once."""
    from hf_streamlm.train.elastic import load_elastic_data, saved_layout

    # Audited when the resume chose it (resume_choice); a checkpoint that came another way (the Hub) is audited here,
    # on the main process, the refusal shared: no rank reads a pickle before every rank knows they all may.
    refused = main_decides(accelerator, safe_load.audit_refusal(path) if accelerator.is_main_process else None)
    if refused:
        raise ConfigError(refused)
    moved = None
    if loader is not None:
        layout = saved_layout(path)
        old_batch = (yaml.safe_load((Path(path) / "config.yaml").read_text()) or {}).get("data", {}).get("batch_size")
        same = layout == (accelerator.num_processes, loader.num_workers)
        if same and batch_size in (None, old_batch):
            loader.load_state_dict(safe_load.load(data_state_file(path, accelerator.process_index)))
        else:
            states = [safe_load.load(data_state_file(path, r)) for r in range(layout[0])]
            resized = replays_other_batches(states, old_batch, batch_size)
            if same and not resized:
                loader.load_state_dict(states[accelerator.process_index])
            else:
                moved = load_elastic_data(accelerator, path, loader, states, layout)
                if resized:
                    moved = f"{resized}: the data state was handed over as on a layout change ({moved})"
    # accelerate's scheduler state (custom_checkpoint_N.pkl) and DeepSpeed's shards are asked for with
    # weights_only=False: forced to weights_only=True, with the allow-list of what they hold (hf_streamlm.train.safe_load).
    with safe_load.weights_only_loads(safe_load.checkpoint_globals(path)):
        accelerator.load_state(str(path))
    if moved:
        accelerator.print(moved)
    return json.loads((path / STATE_FILE).read_text())


def replays_other_batches(states: list[dict[str, Any]], old: int | None, batch_size: int | None) -> str | None:
    """``data.batch_size OLD -> NEW`` when the checkpoint's data ``states`` (one per rank) replay batches made at
    batch size ``old``, not ``batch_size`` (DataLoader workers: the batches consumed since a worker's last
    snapshot), else None. Refused in one line for a state written before issue 25 by a reader still finishing
    the passes taken over at a layout change (it replays every batch made since, at the old size)."""
    if batch_size is None or old is None or old == batch_size:
        return None
    entries = [entry for state in states for entry in state["workers"].values()]
    if any("replay" in e["snapshot"] and e["snapshot"].get("batches") for e in entries):
        raise ConfigError(f"data.batch_size differs from the checkpoint's ({old} -> {batch_size}) while its data state "
                          f"still replays the batches made at {old} since a layout change: resume with "
                          f"data.batch_size={old} until its readers have left the passes taken over, then change it")
    return f"data.batch_size {old} -> {batch_size}" if any(e["skip"] for e in entries) else None


# --------------------------------------------------------------------------------------------------
# Reading a model back (``hf-streamlm export``/``eval``, the end of a DeepSpeed run)
# --------------------------------------------------------------------------------------------------


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a checkpoint, else a run directory's checkpoint that ``latest.json`` names (the
    newest complete one without it)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if (path / "config.yaml").is_file():
        config = load_config([f"recipe={path / 'config.yaml'}", "runtime.resume=never"])
        directory = Path(config.runtime.checkpoint.directory or path / "checkpoints")
        found = list_checkpoints(directory)
        if found:
            latest, _ = read_latest(directory)  # the timeline trained last
            return latest if latest is not None and (latest / STATE_FILE).is_file() else found[-1]
    raise ConfigError(f"'{path}' is neither a checkpoint (step-<N>/ with {STATE_FILE}) nor a run directory with one")


def load_checkpoint_model(path: str | Path) -> tuple[PreTrainedModel, object, Config]:
    """Rebuild the model of a checkpoint (or the newest one of a run directory) on the CPU."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from hf_streamlm.train.builders import build_model

    ckpt = find_checkpoint(path)
    config = load_config([f"recipe={ckpt / 'config.yaml'}", "runtime.resume=never"])
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    model = build_model(config, tokenizer)
    # A run with runtime.compile=true saves the compiled wrapper's keys ("_orig_mod." prefix).
    # DeepSpeed and FSDP checkpoints hold shards instead of model.safetensors (hf_streamlm.train.zero, .fsdp), read by
    # DeepSpeed's zero_to_fp32 and torch's DCP, which unpickle: the shards are audited, then read with weights_only.
    if is_zero_checkpoint(ckpt) or is_fsdp_checkpoint(ckpt):
        safe_load.audit(ckpt)
        with safe_load.weights_only_loads(safe_load.checkpoint_globals(ckpt)):
            weights = zero_checkpoint_weights(ckpt) if is_zero_checkpoint(ckpt) else fsdp_checkpoint_weights(ckpt)
    else:
        weights = load_file(ckpt / "model.safetensors")
    state = {k.removeprefix("_orig_mod."): v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Accelerate drops tied copies (e.g. the MLM decoder that shares the embedding) when saving.
    tied = set(getattr(model, "all_tied_weights_keys", None) or model._tied_weights_keys or {})
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval(), tokenizer, config


def trained_model(accelerator, model, checkpoints: Path, step: int):
    """The model to export at the end of training. Under DeepSpeed it is read back from the checkpoint of
    ``step`` in ``checkpoints`` (written, complete, at the last step): ZeRO-3 holds each parameter in pieces
    across the processes, and the checkpoint holds the fp32 master weights under every stage and precision.
    Main process only. The same under FSDP (hf_streamlm.train.fsdp), whose parameters are sharded DTensors."""
    if accelerator.state.deepspeed_plugin is None and accelerator.distributed_type != "FSDP":
        return accelerator.unwrap_model(model, keep_torch_compile=False)
    final = Path(checkpoints) / f"step-{step}"
    if not (final / STATE_FILE).is_file():
        raise RuntimeError(f"a DeepSpeed or FSDP run is exported from its last checkpoint, and {final} is missing")
    with without_zero3_init():
        return load_checkpoint_model(final)[0]
