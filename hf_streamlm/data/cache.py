"""The processed-data cache (seed 003's "Streaming + Cache"): the first run streams a source, filters and
caps it, and saves the resulting ``text`` rows under ``.dataset_cache/processed/<key>/``; later runs open
that folder instead of touching the network or re-reading raw files.

An entry is a ``save_to_disk`` folder plus ``meta.json``. It is built in a private temporary folder and
renamed into place with ``meta.json`` already inside, so a folder named by a key is either complete or
was left half-removed by hand; one without ``meta.json`` is rebuilt.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

from hf_streamlm.config import ConfigError, SourceConfig

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = ".dataset_cache"
META = "meta.json"
TMP_PREFIX = ".tmp-"
STALE_TMP_S = 24 * 3600
"""A temporary folder from another host (whose process we cannot check) is stale after this long."""

# Fields that only say how rows are delivered or mixed, never which rows: they stay out of the key, so
# turning caching on or reweighting a mixture reuses the entry.
NON_CONTENT_FIELDS = frozenset({"weight", "streaming", "cache"})


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or DEFAULT_CACHE_DIR) / "processed"


def _is_remote(path: str) -> bool:
    return "://" in path  # http(s)://, hf://, s3://: not on this file system


def _local_files(source: SourceConfig) -> list[str]:
    """The local files behind ``source``: its data_files (globs expanded) or the builtin corpus."""
    if source.path == "builtin":
        from hf_streamlm.data.corpus import BUILTIN_CORPORA

        corpus = BUILTIN_CORPORA.get(source.name)
        return [str(corpus)] if corpus else []
    files = source.data_files
    if files is None:
        return []
    if isinstance(files, dict):  # {split: files}, accepted by datasets though not by the config type
        files = [f for value in files.values() for f in ([value] if isinstance(value, str) else value)]
    patterns = [files] if isinstance(files, str) else list(files)
    return [m for p in patterns if not _is_remote(p) for m in sorted(glob.glob(p))]


def cache_key(source: SourceConfig, extra: dict[str, Any]) -> str:
    """A stable hex digest of everything that decides the processed rows of ``source``.

    Local files enter with their absolute path, size and mtime_ns, so editing or touching one makes a
    new key; remote sources are keyed by the revision as given (``null`` means "whatever main is", which
    the cache then pins until cleared).
    """
    fields = {k: v for k, v in dataclasses.asdict(source).items() if k not in NON_CONTENT_FIELDS}
    files = []
    for f in _local_files(source):
        st = os.stat(f)
        files.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    payload = {"source": fields, "extra": extra, "files": files}
    blob = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _read_meta(entry: Path) -> dict[str, Any] | None:
    try:
        return json.loads((entry / META).read_text())
    except (OSError, ValueError):
        return None


def _no_rows():
    yield from ()


def _open(entry: Path, docs: int, num_shards: int) -> datasets.IterableDataset:
    ds = datasets.load_from_disk(str(entry / "data"))
    if not docs:  # to_iterable_dataset cannot shard zero rows
        return datasets.IterableDataset.from_generator(_no_rows, features=ds.features)
    # Several shards let DataLoader workers and ranks (split_dataset_by_node) each read their own part.
    return ds.to_iterable_dataset(num_shards=max(1, min(num_shards, docs)))


def _tmp_dir(root: Path, key: str) -> Path:
    # Host and pid in the name: clear_cache can tell a crashed build from a running one.
    return root / f"{TMP_PREFIX}{key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _discard(path: Path, root: Path) -> None:
    """Remove ``path`` without racing readers/builders: rename it away first (atomic), then delete."""
    trash = _tmp_dir(root, "trash")
    try:
        path.rename(trash)
    except OSError:
        return  # someone else moved or removed it
    shutil.rmtree(trash, ignore_errors=True)


def _write(rows: datasets.IterableDataset, target: Path) -> int:
    """Iterate ``rows`` once into a ``save_to_disk`` folder ``target/data``; returns the document count."""
    it = iter(rows)
    first = next(it, None)  # from_generator refuses an empty stream: look before handing it over
    count = 0

    def gen():
        nonlocal count
        count = 1
        yield first
        for row in it:
            count += 1
            yield row

    work = target / "generate"
    if first is None:
        features = rows.features or datasets.Features({"text": datasets.Value("string")})
        ds = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    else:
        # A fresh fingerprint: no hashing of the closure, and nothing shared with a concurrent build.
        ds = datasets.Dataset.from_generator(
            gen, features=rows.features, cache_dir=str(work), fingerprint=uuid.uuid4().hex
        )
    ds.save_to_disk(str(target / "data"), num_shards=None if first is not None else 1)  # 0 shards won't load
    del ds
    shutil.rmtree(work, ignore_errors=True)  # from_generator's own arrow cache: save_to_disk copied it
    return count


def cached_source(
    source: SourceConfig,
    build: Callable[[], datasets.IterableDataset],
    cache_dir: str | None,
    extra: dict[str, Any],
    num_shards: int = 8,
) -> datasets.IterableDataset:
    """Open the cached rows of ``source``, building them once with ``build()`` if the entry is missing.

    ``build`` returns the final stream of the source (``text`` column, already filtered and capped); it
    is called at most once, and not at all on a cache hit.
    """
    root = cache_root(cache_dir)
    key = cache_key(source, extra)
    entry = root / key
    meta = _read_meta(entry)
    if meta is not None:
        logger.info("cache hit %s (%d docs)", key[:12], meta["docs"])
        return _open(entry, meta["docs"], num_shards)
    if entry.exists():  # no meta.json: a half-removed or hand-edited entry
        logger.info("cache entry %s is incomplete; rebuilding", key[:12])
        _discard(entry, root)

    root.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_dir(root, key)
    tmp.mkdir()
    logger.info("caching %s -> %s", _label(source), entry)
    try:
        docs = _write(build(), tmp)
        meta = {
            "key": key,
            "label": _label(source),
            "source": dataclasses.asdict(source),
            "extra": extra,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "docs": docs,
            "bytes": _dir_size(tmp / "data"),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))  # last: marks the entry complete
        try:
            tmp.rename(entry)
        except OSError:
            # Another process finished the same key first; its rows are the same, keep them.
            if _read_meta(entry) is None:
                raise
            logger.info("cache entry %s was written by another process; using it", key[:12])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = _read_meta(entry) or meta
    return _open(entry, meta["docs"], num_shards)


def _label(source: SourceConfig) -> str:
    """``pydocs``, ``json:corpus.jsonl``, ``wikitext/wikitext-103-raw-v1`` (as sources.describe_source)."""
    if source.path == "builtin":
        return str(source.name)
    if source.data_files:
        files = source.data_files if isinstance(source.data_files, str) else ",".join(map(str, source.data_files))
        return f"{source.path}:{files}"
    return f"{source.path}/{source.name}" if source.name else source.path


def _entries(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(TMP_PREFIX))


def cache_entries(cache_dir: str | None) -> list[dict[str, Any]]:
    """The ``meta.json`` of every complete entry, plus ``path`` and ``size`` (bytes on disk), oldest first."""
    out = []
    for entry in _entries(cache_root(cache_dir)):
        meta = _read_meta(entry)
        if meta is not None:
            out.append({**meta, "path": str(entry), "size": _dir_size(entry)})
    return sorted(out, key=lambda m: m.get("created", ""))


def _stale(tmp: Path) -> bool:
    """A temporary folder whose build died: its process is gone (same host) or it is a day old."""
    try:
        _, rest = tmp.name[len(TMP_PREFIX):].split("-", 1)
        host, pid, _ = rest.rsplit("-", 2)  # the host name may itself hold dashes
        if host == socket.gethostname():
            os.kill(int(pid), 0)
            return False
    except ProcessLookupError:
        return True
    except (ValueError, OSError):
        pass  # foreign name or no permission to signal: decide by age
    try:
        return time.time() - tmp.stat().st_mtime > STALE_TMP_S
    except OSError:
        return False


def clear_cache(cache_dir: str | None, key: str | None = None) -> int:
    """Remove every entry (or the one whose key is or starts with ``key``) and stale temporary folders.

    Returns the number of entries removed. An ambiguous key prefix is a :class:`ConfigError`.
    """
    root = cache_root(cache_dir)
    entries = _entries(root)
    if key is not None:
        entries = [p for p in entries if p.name.startswith(key)]
        if len(entries) > 1:
            raise ConfigError(f"cache key '{key}' matches {len(entries)} entries; give more characters")
    for entry in entries:
        _discard(entry, root)
    if root.is_dir():
        for tmp in root.iterdir():
            if tmp.name.startswith(TMP_PREFIX) and _stale(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return len(entries)


def cache_usage(cache_dir: str | None) -> int:
    """Bytes under the processed cache, incomplete entries and temporary folders included."""
    root = cache_root(cache_dir)
    return _dir_size(root) if root.is_dir() else 0
