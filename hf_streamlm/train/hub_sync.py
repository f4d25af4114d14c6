"""Checkpoints on the Hub: pushed in the background while the run trains, resumed from on an empty machine.

**Pushing** (``hub.push``, ``hub.strategy``). A thread of the main process uploads, each try of a commit in a
process of its own at the lowest priority (hashing and encoding a checkpoint would otherwise hold Python's lock
against the training's thread); no other rank takes part, and a training step never waits for the network: a
save stays local, and queuing it hard-links its files into ``<run>/.hub-pending/step-<N>/`` (checkpoint files are
never modified in place, so rotation may delete the checkpoint meanwhile; a few milliseconds, whatever the
checkpoint's size). Under ``every_save`` and the checkpoint
strategies the export of each save is written there too, on the main process (the one part of a push that is not
in the background: it reads the model as the step left it). Each save is one commit (``create_commit``): the
export at the repository's root, the checkpoint under ``checkpoints/step-<N>/`` with its manifest, its step in
the message; then the branch ``step-<N>`` (``<revision>-step-<N>`` on another branch than main) at that commit.

When the Hub is slower than the checkpoints, the queue keeps the milestones (the best, multiples of
``hub.keep_every_n_steps``, the last) and of the others only the newest: a save superseded before its push
started, or while its push waits to be retried, is dropped (and logged). Commits are at least
``hub.min_commit_interval`` apart (the Hub's limit: ~128 commits per hour and repository). A 429, a 5xx or a
network error is retried ``hub.retries`` times with a doubling backoff from ``hub.retry_backoff``, or the
``Retry-After`` the Hub sent when that is longer: ``create_commit`` itself does not retry. The end of the run (and
a stop signal) waits ``hub.flush_timeout`` for the queue, then lists what was not pushed.

**Resuming** (``runtime.resume=hub:<repo_id>[@revision]``, and ``auto`` when the run has no checkpoint and
``hub.repo_id`` is set). The main process lists ``checkpoints/`` at one commit of the repository, takes the
newest checkpoint whose listing holds its state file and every file of its manifest at the manifest's size,
downloads it into the run's checkpoints (aside, then renamed: a kill leaves a ``.tmp-`` folder that the next
save removes), checks it again on disk (:func:`hf_streamlm.train.checkpoint.damage`) and passes over incomplete
ones; the path is then shared with the other ranks (``main_decides``) and the resume is a local one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_streamlm.config import Config, ConfigError
from hf_streamlm.durable import sync_dir
from hf_streamlm.train import checkpoint as ckpt

logger = logging.getLogger(__name__)

REPO_CHECKPOINTS = "checkpoints"
"""The folder of the repository that holds ``step-<N>/`` checkpoints."""
PENDING = ".hub-pending"
"""``<run>/.hub-pending/``: what is queued for the Hub (hard links to checkpoint files, exports)."""
MAX_BACKOFF = 600.0


# --------------------------------------------------------------------------------------------------
# Retries
# --------------------------------------------------------------------------------------------------


class Abandoned(Exception):
    """The push stopped waiting: superseded by a newer save, or the flush ran out of time."""


class Failure(Exception):
    """A try of a commit that failed in its process (:data:`COMMIT`), as that process reported it."""

    def __init__(self, message: str, status: int | None = None, retry_after: str | None = None,
                 names: list[str] | None = None):
        super().__init__(message)
        self.status, self.retry_after, self.names = status, retry_after, set(names or [])


def _status(err: BaseException) -> int | None:
    return err.status if isinstance(err, Failure) else getattr(getattr(err, "response", None), "status_code", None)


def retry_after(err: BaseException) -> float | None:
    """Seconds the Hub asked to wait (``Retry-After``), or None."""
    if isinstance(err, Failure):
        value = err.retry_after
    else:
        response = getattr(err, "response", None)
        value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not sent by the Hub
        return None


def retryable(err: BaseException) -> bool:
    """429, 408 and 5xx answers, and network errors: dropped connections, timeouts (the HTTP client's
    ``TransportError``s, found by name: huggingface_hub 2.x uses ``httpx2``, 1.x ``httpx``)."""
    names = err.names if isinstance(err, Failure) else {cls.__name__ for cls in type(err).__mro__}
    if "OfflineModeIsEnabled" in names:  # a ConnectionError, which no retry cures
        return False
    if "HfHubHTTPError" in names:
        status = _status(err)
        return status in (408, 429) or (status is not None and status >= 500)
    return bool(names & NETWORK_ERRORS)


NETWORK_ERRORS = {"TransportError", "NetworkError", "ProtocolError", "TimeoutException", "ConnectionError",
                  "TimeoutError"}


def with_retries(call, what: str, tries: int, backoff: float, wait=time.sleep):
    """``call()``, retried on :func:`retryable` errors ``tries`` times; ``wait(seconds)`` sleeps between tries
    (the pusher's may raise :class:`Abandoned`)."""
    for attempt in range(tries + 1):
        try:
            return call()
        except Exception as err:
            if attempt == tries or not retryable(err):
                raise
            delay = min(MAX_BACKOFF, backoff * 2 ** attempt)
            delay = max(delay, retry_after(err) or 0.0)
            logger.warning("%s: %s; try %d of %d in %.1f s", what, describe(err), attempt + 2, tries + 1, delay)
            wait(delay)


def describe(err: BaseException) -> str:
    status = _status(err)
    if status:
        return f"HTTP {status}"
    return str(err)[:300] if isinstance(err, Failure) else f"{type(err).__name__}: {str(err)[:200]}"


# --------------------------------------------------------------------------------------------------
# Pushing
# --------------------------------------------------------------------------------------------------


@dataclass
class Upload:
    """One commit to make: a save (``step``), or the final export (``step`` None)."""

    step: int | None
    checkpoint: Path | None = None
    export: Path | None = None
    milestone: str | None = None  # "best", "every N", "last": never coalesced away
    staged: list[Path] = field(default_factory=list)  # removed once pushed or dropped

    @property
    def name(self) -> str:
        return "the final export" if self.step is None else f"step-{self.step}"


def start_pusher(config: Config, accelerator, out: Path, model, tokenizer) -> HubPusher | NoPush:
    """The background uploader on the main process when ``hub.push``; elsewhere one that does nothing."""
    if not (config.hub.push and accelerator.is_main_process):
        return NoPush()
    return HubPusher(config, accelerator, Path(out), model, tokenizer)


class NoPush:
    """Other ranks, and runs that push nothing: every call returns at once."""

    def saved(self, *args, **kwargs) -> None:
        pass

    def finish(self, export_dir: Path | None = None, step: int | None = None) -> list[str]:
        return []


class HubPusher:
    """A queue of saves and a daemon thread that commits them to ``hub.repo_id`` (see the module's docstring)."""

    def __init__(self, config: Config, accelerator, out: Path, model, tokenizer):
        self.config, self.hub, self.accelerator = config, config.hub, accelerator
        self.model, self.tokenizer = model, tokenizer
        self.pending = out / PENDING
        if self.pending.exists():  # a killed run's queue: its checkpoints are local, or gone with the machine
            shutil.rmtree(self.pending, ignore_errors=True)
        self.queue: list[Upload] = []
        self.cond = threading.Condition()
        self.busy: Upload | None = None
        self.deadline: float | None = None  # set by finish(): the thread gives up at this time
        self.last_commit = -math.inf
        self.ready = False  # repository and branch made
        self.pushed: list[str] = []
        self.dropped: list[str] = []
        self.failed: list[str] = []
        self.thread = threading.Thread(target=self._work, name="hf_streamlm-hub-push", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------------- the training side (main process)

    def saved(self, path: Path | None, state: dict, best: bool = False, last: bool = False) -> None:
        """Queue the save of ``path`` (step ``state["step"]``) as ``hub.strategy`` says; returns at once."""
        strategy, step = self.hub.strategy, state["step"]
        if strategy == "end" or path is None:
            return
        every = self.hub.keep_every_n_steps
        milestone = "last" if last else "best" if best else f"every {every}" if every and step % every == 0 else None
        upload = Upload(step, milestone=milestone)
        folder = self.pending / f"step-{step}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        if strategy in ("checkpoint", "all_checkpoints"):
            upload.checkpoint = link_tree(path, folder / "checkpoint")
        upload.export = self._export(path, state, folder / "export")
        upload.staged.append(folder)
        self._put(upload)

    def finish(self, export_dir: Path | None = None, step: int | None = None) -> list[str]:
        """Queue the final export (when given; of step ``step``), wait up to ``hub.flush_timeout`` for the queue, and
        return (and log) what was not pushed."""
        if export_dir is not None:
            with self.cond:
                same = next((u for u in self.queue if step is not None and u.step == step), None)
                if same is not None:  # the last save is still queued: one commit with the final export
                    same.export = Path(export_dir)
                else:
                    self.queue.append(Upload(None, export=Path(export_dir), milestone="last"))
                self.cond.notify_all()
        with self.cond:
            self.deadline = time.monotonic() + self.hub.flush_timeout
            self.cond.notify_all()
            while (self.queue or self.busy) and time.monotonic() < self.deadline:
                self.cond.wait(min(1.0, max(0.0, self.deadline - time.monotonic())))
            left = [u.name for u in ([self.busy] if self.busy else []) + self.queue]
            self.queue.clear()
        self.thread.join(timeout=5)
        missed = [f"{name} (not pushed within hub.flush_timeout={self.hub.flush_timeout:g} s)" for name in left]
        missed += self.failed
        if missed:
            logger.warning("not pushed to %s: %s; the run directory %s still has what was saved locally (checkpoints "
                           "rotated away since are lost)", self.hub.repo_id, "; ".join(missed), self.pending.parent)
        elif self.pushed:
            logger.info("pushed to %s: %s", self.hub.repo_id, ", ".join(self.pushed))
        if not left:
            shutil.rmtree(self.pending, ignore_errors=True)
        return missed

    def _export(self, path: Path, state: dict, dest: Path) -> Path:
        """The export of this save, written on the main process (under its own RNG: building the stock class of
        the native format draws initial weights, which must not shift the run's random stream)."""
        from hf_streamlm.export import export_run
        from hf_streamlm.train.checkpoint import trained_model

        cuda = self.accelerator.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.accelerator.device] if cuda else []):
            model = trained_model(self.accelerator, self.model, path.parent, state["step"])
            return export_run(model, self.tokenizer, self.config, dest, self.config.runtime.export_format,
                              summary=state)

    def _put(self, upload: Upload) -> None:
        with self.cond:
            if upload.milestone is None:  # coalesce: only the newest ordinary save waits
                for old in [u for u in self.queue if u.milestone is None]:
                    self.queue.remove(old)
                    self._drop(old, f"superseded by step-{upload.step} before its push started")
            self.queue.append(upload)
            self.cond.notify_all()

    def _drop(self, upload: Upload, why: str) -> None:
        self.dropped.append(upload.name)
        logger.info("hub push of %s dropped: %s", upload.name, why)
        for path in upload.staged:
            shutil.rmtree(path, ignore_errors=True)

    # ---------------------------------------------------------------- the thread

    def _expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _wait(self, seconds: float, upload: Upload | None = None) -> None:
        """Sleep ``seconds``; raise :class:`Abandoned` when the flush runs out of time, or when a newer ordinary
        save supersedes ``upload`` (not a milestone) meanwhile."""
        until = time.monotonic() + seconds
        with self.cond:
            while True:
                if self._expired():
                    raise Abandoned("hub.flush_timeout reached")
                if upload is not None and upload.milestone is None and any(
                        u.milestone is None for u in self.queue):
                    raise Abandoned("superseded by a newer save while waiting to retry")
                left = until - time.monotonic()
                if left <= 0:
                    return
                self.cond.wait(min(left, 1.0))

    def _work(self) -> None:
        # Hashing and encoding the files takes CPU; the training's threads (data workers included) come first. Linux
        # gives each thread its own nice value, inherited by the threads this one starts (huggingface_hub's).
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            with self.cond:
                while not self.queue and not self._expired() and self.deadline is None:
                    self.cond.wait(1.0)
                if self._expired() or not self.queue:  # out of time, or finish() and nothing left
                    return
                upload = self.busy = self.queue.pop(0)
            try:
                self._wait(self.last_commit + self.hub.min_commit_interval - time.monotonic(), upload)
                self._push(upload)
                self.pushed.append(upload.name)
                for path in upload.staged:
                    shutil.rmtree(path, ignore_errors=True)
            except Abandoned as why:
                if self._expired():
                    with self.cond:
                        self.queue.insert(0, upload)  # listed by finish()
                else:
                    self._drop(upload, str(why))
            except Exception as err:  # noqa: BLE001 - given up: listed at the end, the run goes on
                self.failed.append(f"{upload.name} ({describe(err)})")
                logger.error("hub push of %s failed: %s", upload.name, describe(err))
            finally:
                with self.cond:
                    self.busy = None
                    self.cond.notify_all()

    def _push(self, upload: Upload) -> None:
        """Commit ``upload``, each try in a process of its own (:data:`COMMIT`): hashing and encoding a checkpoint
        holds Python's lock for long stretches, which a thread would take from the training's own thread (a fifth of
        the step time in benchmarks/bench_hub_push.py before this); a try still running when the flush runs out of
        time is killed."""
        from hf_streamlm.export import NEVER_PUSHED

        hub = self.hub
        add = []
        if upload.export is not None:
            add += [[rel, str(file)] for rel, file in files_of(upload.export)
                    if not any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel.rsplit("/", 1)[-1], p) for p in NEVER_PUSHED)]
        if upload.checkpoint is not None:
            add += [[f"{REPO_CHECKPOINTS}/step-{upload.step}/{rel}", str(file)] for rel, file in files_of(upload.checkpoint)]
        spec = {
            "repo_id": hub.repo_id, "private": hub.private, "revision": hub.revision, "create": not self.ready, "add": add,
            "message": hub.commit_message if upload.step is None else f"{hub.commit_message} (step {upload.step})",
            "step": upload.step, "branch": None if upload.step is None else step_branch(hub.revision, upload.step),
            # hub.strategy=checkpoint: the other checkpoints go, but the multiples of keep_every_n_steps
            "prune": (hub.keep_every_n_steps or 0) if hub.strategy == "checkpoint" and upload.checkpoint else None,
        }
        url = with_retries(lambda: self._commit_process(spec), f"hub push of {upload.name}", hub.retries,
                           hub.retry_backoff, lambda seconds: self._wait(seconds, upload))
        self.ready = True
        self.last_commit = time.monotonic()
        logger.info("pushed %s to %s (%s)", upload.name, hub.repo_id, url)

    def _commit_process(self, spec: dict) -> str:
        """One try of a commit, in a process of its own (the Hub's address and token are this one's environment):
        its URL, or :class:`Failure`."""
        import subprocess
        import sys

        proc = subprocess.Popen([sys.executable, "-c", COMMIT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        given = json.dumps(spec)
        while True:
            try:
                out, err = proc.communicate(given, timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                given = None  # sent already
                if self._expired():
                    proc.kill()
                    proc.communicate()
                    raise Abandoned("hub.flush_timeout reached") from None
        lines = out.strip().splitlines()
        try:
            answer = json.loads(lines[-1])
        except (IndexError, ValueError):
            raise Failure(f"the commit process ended with status {proc.returncode}: {err.strip()[-300:]}") from None
        if answer.get("ok"):
            return answer["url"]
        raise Failure(answer["error"], answer.get("status"), answer.get("retry_after"), answer.get("names"))


COMMIT = """
import json, os, sys
os.nice(19)  # the training's processes first
spec = json.load(sys.stdin)
try:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import EntryNotFoundError

    api, repo, revision = HfApi(), spec["repo_id"], spec["revision"]
    if spec["create"]:
        api.create_repo(repo, private=spec["private"], exist_ok=True)
        if revision and revision != "main":  # create_commit needs the branch to exist
            api.create_branch(repo, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo, path) for path_in_repo, path in spec["add"]]
    if spec["prune"] is not None:
        try:
            listed = [entry.path for entry in api.list_repo_tree(repo, "checkpoints", revision=revision)]
        except EntryNotFoundError:
            listed = []
        for path in listed:
            name = path.rsplit("/", 1)[-1]
            step = int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None
            if step is not None and step != spec["step"] and not (spec["prune"] and step % spec["prune"] == 0):
                operations.append(CommitOperationDelete(path + "/", is_folder=True))
    info = api.create_commit(repo, operations, commit_message=spec["message"], revision=revision)
    if spec["branch"]:
        api.create_branch(repo, branch=spec["branch"], revision=info.oid, exist_ok=True)
    print(json.dumps({"ok": True, "url": info.commit_url}))
except Exception as err:
    response = getattr(err, "response", None)
    print(json.dumps({"ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}",
                      "status": getattr(response, "status_code", None),
                      "retry_after": response.headers.get("Retry-After") if response is not None else None,
                      "names": [cls.__name__ for cls in type(err).__mro__]}))
"""
"""One try of a commit (``python -c``, the spec as JSON on stdin, one JSON line back): the repository and its branch
when not made yet, the files, the deletions of ``hub.strategy=checkpoint``, the commit, the branch ``step-<N>``.
It imports huggingface_hub only, not hf_streamlm; each step of it is safe to repeat."""


def step_branch(revision: str | None, step: int) -> str:
    """The branch that marks a save's commit: ``step-<N>``, or ``<revision>-step-<N>`` off the main branch."""
    return f"step-{step}" if revision in (None, "main") else f"{revision}-step-{step}"


def link_tree(source: Path, dest: Path) -> Path:
    """``dest``: a copy of ``source`` made of hard links (a copy where the file system has none)."""
    try:
        shutil.copytree(source, dest, copy_function=os.link)
    except OSError:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest)
    return dest


def files_of(folder: Path) -> list[tuple[str, Path]]:
    return [(p.relative_to(folder).as_posix(), p) for p in sorted(folder.rglob("*")) if p.is_file()]


# --------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------


def resume_choice(config: Config, directory: Path) -> tuple[Path | None, str | None]:
    """:func:`hf_streamlm.train.checkpoint.resume_choice`, with the Hub: ``runtime.resume=hub:<repo>[@rev]``
    downloads the newest complete checkpoint there into ``directory``; ``auto`` does so for ``hub.repo_id`` (at
    ``hub.revision``) when ``directory`` has no complete checkpoint. Main process only; the value is shared."""
    mode, hub = config.runtime.resume, config.hub
    try:
        if mode.startswith("hub:"):
            repo_id, _, revision = mode.removeprefix("hub:").partition("@")
            found = fetch_checkpoint(config, repo_id, revision or None, directory)
            if found is None:
                raise ConfigError(f"runtime.resume={mode}: no complete checkpoint under {REPO_CHECKPOINTS}/ there "
                                  "(push them with hub.push=true hub.strategy=checkpoint or all_checkpoints)")
            return found, None
        if mode == "auto" and hub.repo_id and not ckpt.list_checkpoints(directory):
            found = fetch_checkpoint(config, hub.repo_id, hub.revision, directory, missing_ok=True)
            if found is not None:
                return found, None
    except ConfigError as err:
        return None, str(err)
    return ckpt.resume_choice(config, directory)


def fetch_checkpoint(config: Config, repo_id: str, revision: str | None, directory: Path,
                     missing_ok: bool = False) -> Path | None:
    """Download the newest complete checkpoint of ``repo_id`` (``checkpoints/step-<N>/``) into ``directory``;
    None when there is none (``missing_ok``: nor the repository or revision, nor a Hub to ask, offline). An answer
    of the Hub that no retry cures is a :class:`ConfigError` naming the repository, not a traceback."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return _fetch_checkpoint(config, repo_id, revision, directory, missing_ok)
    except Exception as err:
        if not (isinstance(err, HfHubHTTPError) or retryable(err)):
            raise
        raise ConfigError(f"could not read checkpoints of {repo_id}@{revision or 'main'} from the Hub "
                          f"({describe(err)}); try again, or set runtime.resume=never to start afresh") from None


def _fetch_checkpoint(config: Config, repo_id: str, revision: str | None, directory: Path,
                      missing_ok: bool) -> Path | None:
    from huggingface_hub import HfApi, RepoFile, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub, where = config.hub, f"{repo_id}@{revision or 'main'}"
    api = HfApi()

    def retried(call, what: str):
        return with_retries(call, f"resume from {where}: {what}", hub.retries, hub.retry_backoff)

    try:
        sha = retried(lambda: api.repo_info(repo_id, revision=revision).sha, "repo_info")
        try:  # every file at one commit: a push meanwhile cannot mix two states
            entries = retried(lambda: list(api.list_repo_tree(repo_id, REPO_CHECKPOINTS, recursive=True, revision=sha)),
                              "list_repo_tree")
        except EntryNotFoundError:
            entries = []
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        if missing_ok:
            logger.info("no checkpoint on the Hub to resume from: %s (%s)", where, type(err).__name__)
            return None
        raise ConfigError(f"runtime.resume=hub:{repo_id}{'@' + revision if revision else ''}: "
                          f"{'no such repository' if isinstance(err, RepositoryNotFoundError) else 'no such revision'}"
                          " (or no access to it: HF_TOKEN)") from None
    except OfflineModeIsEnabled:
        if missing_ok:
            logger.warning("HF_HUB_OFFLINE is set: not looking for checkpoints of %s on the Hub", where)
            return None
        raise ConfigError(f"runtime.resume=hub:{repo_id}: HF_HUB_OFFLINE is set; unset it to download") from None

    folders: dict[int, dict[str, int]] = {}
    for entry in entries:
        parts = entry.path.split("/", 2)
        match = ckpt.STEP_DIR.match(parts[1]) if len(parts) == 3 else None
        if match and isinstance(entry, RepoFile):
            folders.setdefault(int(match.group(1)), {})[parts[2]] = entry.size
    for step in sorted(folders, reverse=True):
        name, listed = f"step-{step}", folders[step]
        if ckpt.STATE_FILE not in listed or ckpt.MANIFEST not in listed:
            logger.warning("skipping %s/%s/%s on the Hub: incomplete (no %s)", where, REPO_CHECKPOINTS, name,
                           ckpt.STATE_FILE if ckpt.STATE_FILE not in listed else ckpt.MANIFEST)
            continue
        manifest = json.loads(Path(retried(lambda name=name: hf_hub_download(
            repo_id, f"{REPO_CHECKPOINTS}/{name}/{ckpt.MANIFEST}", revision=sha), "manifest")).read_text())
        wrong = [f for f, size in manifest.items() if listed.get(f) != size]
        if wrong:
            logger.warning("skipping %s/%s/%s on the Hub: incomplete (%s missing or of another size than its "
                           "manifest says)", where, REPO_CHECKPOINTS, name, ", ".join(wrong[:5]))
            continue
        local = directory / name
        if (local / ckpt.STATE_FILE).is_file() and ckpt.damage(local) is None:
            return local  # already here
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".tmp-hub-{name}"  # .tmp-*: removed by the next save if a kill leaves it
        shutil.rmtree(tmp, ignore_errors=True)
        retried(lambda name=name, tmp=tmp: snapshot_download(repo_id, revision=sha, local_dir=tmp,
                                                             allow_patterns=[f"{REPO_CHECKPOINTS}/{name}/*"]),
                f"download {name}")
        got = tmp / REPO_CHECKPOINTS / name
        why = ckpt.damage(got) if (got / ckpt.STATE_FILE).is_file() else f"no {ckpt.STATE_FILE}"
        if why:
            logger.warning("skipping %s/%s/%s from the Hub: %s", where, REPO_CHECKPOINTS, name, why)
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        if local.exists():
            ckpt.remove_dir(local)  # a damaged copy
        got.rename(local)
        shutil.rmtree(tmp, ignore_errors=True)
        sync_dir(directory)
        adopt_tokenizer(local, config.output_dir)
        logger.warning("resuming from the Hub: %s/%s/%s (commit %s), downloaded to %s", where, REPO_CHECKPOINTS,
                       name, sha[:12], local)
        return local
    if not missing_ok:
        return None
    logger.info("no complete checkpoint on the Hub in %s/%s/: a fresh start", where, REPO_CHECKPOINTS)
    return None


def adopt_tokenizer(checkpoint: Path, out: Path) -> None:
    """An empty run directory gets the checkpoint's tokenizer as ``<run>/tokenizer`` (the run would otherwise train
    one again from the stream)."""
    saved, source = out / "tokenizer", checkpoint / "tokenizer"
    if (saved / "tokenizer.json").is_file() or not (source / "tokenizer.json").is_file():
        return
    tmp = out / ".tmp-tokenizer"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(saved, ignore_errors=True)
    tmp.rename(saved)


__all__ = ["HubPusher", "NoPush", "fetch_checkpoint", "resume_choice", "start_pusher", "step_branch"]
