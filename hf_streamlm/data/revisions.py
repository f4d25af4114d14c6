"""Pinned Hub revisions: the commit each Hub dataset source resolved to at a run's first start.

Exact resume stores positions in the sources (shard, row); they only mean the same documents while
the source holds the same files. A Hub source without ``revision`` follows its branch, and a branch
moves (FineWeb gains dumps): positions saved against one commit would silently point at other rows
after a push. So the first start asks the Hub (``HfApi.dataset_info``, at the ``HF_ENDPOINT`` that
``datasets`` reads from) which commit each source's branch is at and records it as the source's
``pinned_revision`` -- in ``config.yaml``, in every checkpoint's ``config.yaml``, in the export's
training config and model card. A resume takes the pins of the checkpoint it resumes from and reads
those commits, whatever the branch says now; a commit the Hub no longer has is one clear error.

Local files, the builtin corpus and ``datasets``' packaged builders (``json``, ``parquet`` ...) are
not Hub repositories and are never pinned (local files enter the processed-data cache key by size and
mtime instead). Offline (``HF_HUB_OFFLINE=1``) nothing can be asked, and nothing is pinned.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import yaml

from hf_streamlm.config import Config, ConfigError, SourceConfig, build

logger = logging.getLogger(__name__)

Pins = list[list[str | None]]
"""Per entry of ``data.sources``: the commit of the source itself, then of each of its fallbacks
(``None``: not a Hub source, or not resolved)."""


def is_hub_source(source: SourceConfig) -> bool:
    """A Hub dataset repository: not the builtin corpus, not a ``datasets`` packaged builder, not a
    local folder or script."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    path = source.path
    return path != "builtin" and path not in _PACKAGED_DATASETS_MODULES and "://" not in path and not os.path.exists(path)


def _chains(config: Config) -> list[list[SourceConfig]]:
    return [[s] + [build(SourceConfig, f) for f in s.fallbacks] for s in config.data.sources]


def _api():
    import datasets
    from huggingface_hub import HfApi

    return HfApi(endpoint=datasets.config.HF_ENDPOINT)  # the Hub the streams read from


def _offline() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def resolve_commit(source: SourceConfig) -> str | None:
    """The commit ``source.revision`` (its branch, tag or sha; ``null``: the default branch) is at now,
    or None when the Hub cannot tell (the open then reports the source's own error, or a fallback is used)."""
    try:
        return _api().dataset_info(source.path, revision=source.revision).sha
    except Exception as err:  # noqa: BLE001 - not pinnable: said once, and the open decides what happens
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        logger.warning("data source %s: could not resolve its Hub commit (%s: %s); it is read unpinned, so a resume "
                       "reads whatever %s holds then", source.path, type(err).__name__, reason,
                       source.revision or "the default branch")
        return None


def check_commit(source: SourceConfig, index: int) -> None:
    """One line when the Hub no longer has the commit ``source`` is pinned to (history squashed, repo
    deleted); transient failures are left to the open's own retries."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        _api().dataset_info(source.path, revision=source.pinned_revision)
    except (RevisionNotFoundError, RepositoryNotFoundError) as err:
        gone = "commit" if isinstance(err, RevisionNotFoundError) else "repository"
        raise ConfigError(
            f"data source {index} ({source.path}) is pinned to commit {source.pinned_revision}, which this run first "
            f"read, and the Hub no longer has that {gone}: an exact resume needs the same rows; start a new "
            "runtime.output_dir (or set runtime.resume=never there) to train on what the repository holds now"
        ) from None
    except Exception as err:  # noqa: BLE001 - a network fault: the stream's retries deal with it
        logger.warning("data source %d: could not check pinned commit %s (%s)", index, source.pinned_revision, err)


def checkpoint_pins(checkpoint: Path) -> Pins | None:
    """The pins recorded in a checkpoint's ``config.yaml`` (None when it has none)."""
    path = Path(checkpoint) / "config.yaml"
    if not path.is_file():
        return None
    return pins_of(yaml.safe_load(path.read_text()) or {})


def pins_of(tree: dict) -> Pins:
    """The pins in a config as a dict (a checkpoint's ``config.yaml``, read)."""
    sources = (tree.get("data") or {}).get("sources") or []
    return [[s.get("pinned_revision")] + [f.get("pinned_revision") for f in s.get("fallbacks") or []]
            for s in sources]


def fill_pins(config: Config, pins: Pins) -> None:
    """Give the sources of ``config`` (and their fallbacks) whose pin is unset the one of ``pins`` (a
    checkpoint's): what a resume reads, and what its stream check compares (``train.elastic``)."""
    for source, row in zip(config.data.sources, pins):
        if source.pinned_revision is None and row:
            source.pinned_revision = row[0]
        for fallback, pin in zip(source.fallbacks, row[1:]):
            if fallback.get("pinned_revision") is None and pin is not None:
                fallback["pinned_revision"] = pin


def pinned_revisions(config: Config, resume_from: Path | None) -> Pins:
    """The commits this run reads: a pin set in the config wins, then the checkpoint resumed from (checked
    to still exist), then what each Hub source resolves to now (a first start, or a checkpoint written
    before pins existed)."""
    saved = checkpoint_pins(resume_from) if resume_from is not None else None
    pins: Pins = []
    for i, chain in enumerate(_chains(config)):
        row = []
        for j, source in enumerate(chain):
            pin = source.pinned_revision
            if pin is None and saved and i < len(saved) and j < len(saved[i]):
                pin = saved[i][j]
            if is_hub_source(source) and not _offline():
                if pin is not None:
                    check_commit(dataclasses.replace(source, pinned_revision=pin), i)
                else:
                    pin = resolve_commit(source)
                    if pin:
                        logger.info("data source %d (%s @ %s) pinned to commit %s", i, source.path,
                                    source.revision or "default branch", pin)
            row.append(pin)
        pins.append(row)
    return pins


def apply_pins(config: Config, pins: Pins) -> None:
    """Write ``pins`` into ``config.data.sources`` (and their fallbacks), where every reader and every
    saved ``config.yaml`` finds them."""
    for source, row in zip(config.data.sources, pins):
        source.pinned_revision = row[0]
        for fallback, pin in zip(source.fallbacks, row[1:]):
            if pin is not None:
                fallback["pinned_revision"] = pin


def hub_datasets(config: Config) -> list[dict[str, str | None]]:
    """``{"id", "config", "split", "revision"}`` of each Hub source in ``data.sources`` (model cards;
    fallbacks, used only when a source cannot be opened, are left out)."""
    return [{"id": s.path, "config": s.name, "split": s.split, "revision": s.pinned_revision or s.revision}
            for s in config.data.sources if is_hub_source(s)]


def pin_hub_sources(config: Config, resume_from: Path | None, accelerator) -> None:
    """Pin each Hub source of ``config`` to a commit: asked once, by the main process, and shared, so
    that every rank reads the same commit; a pinned commit that is gone stops every rank."""
    found = None
    if accelerator.is_main_process:
        try:
            found = (pinned_revisions(config, resume_from), None)
        except ConfigError as err:
            found = (None, str(err))
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        found = broadcast_object_list([found])[0]
    pins, error = found
    if error:
        raise ConfigError(error)
    apply_pins(config, pins)
